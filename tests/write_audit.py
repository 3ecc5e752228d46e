"""Python source for probes that run in a fresh interpreter and record every attempt to write a file
(``open`` for writing, rename, remove, truncate, copy, mkdir) through an audit hook, into ``writes``.
Import the frameworks before installing it: first imports may legitimately write caches."""

WRITE_AUDIT_HOOK = """
import os, sys
writes = []
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE):
            writes.append(str(path))
    elif event in ("os.rename", "os.replace", "os.remove", "os.truncate", "shutil.copyfile", "os.mkdir"):
        writes.append(f"{event}:{args[0]}")
sys.addaudithook(_hook)
"""
