"""``modelseal.tvm``: compiled TVM modules (Relax VM executables) and their params, from memory only.

What an owner ships (:func:`export` writes it; ``modelseal seal out_dir sealed_dir`` seals it like any
directory, or ``--as-bundle`` into one file):

* ``model.so``: the executable compiled for ``llvm`` (``tvm.compile(mod, target="llvm")``), exported
  with ``export_library``: native code, the kernels of the model;
* ``params.safetensors``: the weights, one tensor per parameter (sealed per tensor, like any
  safetensors file in a sealed directory);
* ``metadata.json``: the function to call (``main``), its inputs and outputs (V2 datatypes, shapes
  with -1 for variable dims) and the names of its params, in the order the function takes them after
  its inputs: the function is called as ``fn(*inputs, *params)``.

Loading a sealed module: each parameter is decrypted straight into the TVM array it becomes (in a
sealed directory; from a bundle it is copied out of the decrypted file, which is wiped at once). The
compiled library is written into an anonymous memory file (``memfd_create``: never on a disk) whose
``/proc/self/fd/N`` path goes to TVM's low-level shared-library loader (``ffi.Module.load_from_file.so``:
``tvm.runtime.load_module`` resolves the path to ``/memfd:... (deleted)`` and then cannot tell its
format from that name). The memory file cannot be zeroed right after loading, as ONNX models' is:
``dlopen`` maps it, and the code pages *are* the file's pages, so zeroing it crashes the next call
(tried). It stays open, holding the code, until :meth:`Module.close` has dropped the module (TVM then
``dlclose``\\ s it); then it is zeroed and closed. Keeping it open also keeps its descriptor number
from being reused while the library is loaded: ``dlopen`` matches an already loaded library by path
name first, so a second memory file that got the same ``/proc/self/fd/N`` would get the first model's
code (checked after each load, see :func:`_check_mapped`).

What stays in memory, and whose: the params are TVM arrays this module keeps and zeroes on close; the
decrypted ``model.so`` is the memory file's pages (ours, zeroed on close); the small ``metadata.json``
buffer is wiped once parsed. TVM makes no copy of either. Outputs are new arrays, the caller's.

A TVM model is native code: loading it runs the library's constructors, and calling it runs its
kernels, with the process's rights. A sealed one is authenticated to its key holders; require the
owner's signature (``trusted_signers``) to accept only what the owner built.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal import atomicfile
from modelseal.crypto import keys
from modelseal.errors import FormatError, MissingDependencyError, UsageError, one_line
from modelseal.format import schema
from modelseal.format.bundle import SealedBundle, is_bundle
from modelseal.format.container import Artifact
from modelseal.format.directory import open_directory
from modelseal.format.dtypes import lookup
from modelseal.format.safetensors import SealedSafetensors, parse_plain_header, tensor_entries
from modelseal.jsonlimits import loads_bounded
from modelseal.load.artifacts import open_artifact, resolve_identity
from modelseal.load.bundles import open_bundle
from modelseal.memory.memfd import write_memory_file, zero_and_close
from modelseal.recipients.registry import IdentitySpec

LIBRARY = "model.so"
PARAMS = "params.safetensors"
METADATA = "metadata.json"
FORMAT = "modelseal-tvm"
FORMAT_VERSION = 1

# metadata.json is input from whoever made the artifact: every field is typed and bounded
MAX_METADATA = 1 << 20  # bytes
MAX_TENSORS = 1024  # inputs, and outputs
MAX_PARAMS = 1 << 16
MAX_NAME = 256
MAX_DIMS = 64
MAX_DIM = (1 << 31) - 1
_FUNCTION = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
# the Open Inference Protocol's datatypes (serve/datatypes.py holds the serving table; the library
# layer must not import the server, so the names are listed here): V2 name -> numpy/TVM dtype name
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip
_TOP_KEYS = {"format", "version", "function", "inputs", "outputs", "params"}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: its name, V2 datatype and shape (None for a variable dim)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class Metadata:
    """``metadata.json``: what to call and with what."""

    function: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    params: tuple[str, ...]

    def to_json(self) -> bytes:
        def tensors(items: tuple[TensorInfo, ...]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": [-1 if d is None else d for d in t.shape]}
                    for t in items]  # fmt: skip

        import json

        doc = {"format": FORMAT, "version": FORMAT_VERSION, "function": self.function, "inputs": tensors(self.inputs),
               "outputs": tensors(self.outputs), "params": list(self.params)}  # fmt: skip
        return json.dumps(doc, indent=1).encode()


def parse_metadata(data: bytes | bytearray | memoryview, source: str) -> Metadata:
    """``metadata.json`` checked field by field (types, sizes, unique names): a :class:`FormatError`
    naming the field, never a ``KeyError`` or ``TypeError`` from deep inside a load."""
    what = f"{source}: {METADATA}"
    doc = schema.obj(loads_bounded(data, max_bytes=MAX_METADATA, max_depth=8, what=what), what)
    unknown = sorted(k[:40] for k in doc if k not in _TOP_KEYS)
    if unknown:
        raise FormatError(f"{what} has unknown field(s) {unknown[:5]}")
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise FormatError(f"{what} is not a {FORMAT} version {FORMAT_VERSION} document (format, version)")
    function = schema.string(doc.get("function", "main"), f"{what}: function", min_len=1, max_len=MAX_NAME)
    if not _FUNCTION.fullmatch(function):
        raise FormatError(f"{what}: function {function[:80]!r} is not a function name")
    inputs = _tensors(doc.get("inputs"), f"{what}: inputs", min_count=0)
    outputs = _tensors(doc.get("outputs"), f"{what}: outputs", min_count=1)
    params = schema.strings(doc.get("params", []), f"{what}: params", max_len=MAX_NAME)
    if len(params) > MAX_PARAMS:
        raise FormatError(f"{what}: params lists {len(params)} tensors, over the limit of {MAX_PARAMS}")
    _unique([*(t.name for t in inputs), *params], f"{what}: input and param names")
    _unique([t.name for t in outputs], f"{what}: output names")
    return Metadata(function, inputs, outputs, tuple(params))


def _tensors(value: Any, what: str, min_count: int) -> tuple[TensorInfo, ...]:
    items = schema.array(value, what)
    if not min_count <= len(items) <= MAX_TENSORS:
        raise FormatError(f"{what} must list {min_count} to {MAX_TENSORS} tensors, not {len(items)}")
    out = []
    for i, item in enumerate(items):
        at = f"{what}[{i}]"
        t = schema.obj(item, at)
        unknown = sorted(k[:40] for k in t if k not in ("name", "datatype", "shape"))
        if unknown:
            raise FormatError(f"{at} has unknown field(s) {unknown[:5]}")
        name = schema.string(t.get("name"), f"{at}.name", min_len=1, max_len=MAX_NAME)
        datatype = schema.string(t.get("datatype"), f"{at}.datatype", max_len=16)
        if datatype not in DATATYPES:
            raise FormatError(f"{at}.datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        dims = schema.array(t.get("shape"), f"{at}.shape")
        if len(dims) > MAX_DIMS:
            raise FormatError(f"{at}.shape has {len(dims)} dimensions, more than {MAX_DIMS}")
        shape = tuple(schema.integer(d, f"{at}.shape", lo=-1, hi=MAX_DIM) for d in dims)
        out.append(TensorInfo(name, datatype, tuple(None if d == -1 else d for d in shape)))
    return tuple(out)


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FormatError(f"{what} must be unique: {name[:80]!r} appears twice")
        seen.add(name)


def _tvm() -> Any:
    # tvm_ffi, on import, JIT-compiles a PyTorch interop extension into ~/.cache/tvm-ffi when the
    # installed PyTorch lacks it (before 2.10 or so): a write to disk at load time, for a feature
    # modelseal does not use
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    try:
        import tvm
    except ImportError:
        raise MissingDependencyError("this needs Apache TVM: pip install 'modelseal[tvm]'") from None
    return tvm


class _MemoryLibrary:
    """The decrypted ``model.so`` in an anonymous memory file with a name of its own, open while TVM has
    it mapped (see the module docstring); :meth:`release` zeroes and closes it once it is unmapped."""

    def __init__(self, data: bytearray) -> None:
        if not hasattr(os, "memfd_create"):
            raise UsageError("a sealed TVM module loads from an anonymous memory file: this needs Linux (memfd_create)")
        self.name = f"modelseal-tvm-{uuid.uuid4().hex}"
        self.size = len(memoryview(data).cast("B"))
        self.fd: int | None = write_memory_file(self.name, data)  # a failed copy is zeroed and closed there
        self.path = f"/proc/self/fd/{self.fd}"

    def mapped(self) -> bool:
        """Whether the process maps this memory file (``/proc/self/maps`` names it ``/memfd:NAME``)."""
        with open("/proc/self/maps", "rb") as maps:
            return f"/memfd:{self.name} ".encode() in maps.read()

    def release(self) -> bool:
        """Zero and close the memory file unless it is still mapped (zeroing mapped code would crash
        whatever still calls it): then only close it, and its pages are freed, unzeroed, when unmapped.
        True when zeroed."""
        if self.fd is None:
            return True
        fd, self.fd = self.fd, None
        try:
            mapped = bool(self.size) and self.mapped()
        except BaseException:
            os.close(fd)
            raise
        if mapped:
            os.close(fd)
            return False
        zero_and_close(fd, self.size)
        return True


def _load_library(tvm: Any, path: str, source: str) -> Any:
    """A compiled module from a shared library at ``path``, through TVM's low-level loader: it takes
    the path as it is (a ``/proc/self/fd/N`` one included) and, unlike ``tvm_ffi.load_module``, does
    not pin the module for the process's life, so unloading the model unloads its code."""
    loader = tvm.get_global_func("ffi.Module.load_from_file.so", allow_missing=True)
    if loader is None:
        raise MissingDependencyError("this TVM build has no shared-library loader: pip install 'modelseal[tvm]'")
    try:
        module = loader(path, "so")
    except Exception as exc:  # TVM raises its own error types for a library it cannot load
        raise FormatError(f"{source}: TVM cannot load the compiled library: {one_line(exc)[:200]}") from None
    if getattr(module, "kind", None) != "relax.VMExecutable":
        raise FormatError(f"{source}: {LIBRARY} is not a Relax VM executable (tvm.compile / relax.build)")
    return module


class Module:
    """A loaded TVM model: :meth:`run` it with numpy arrays by input name. Made by :func:`load` (or
    :func:`module_from_artifacts`, :func:`module_from_plain`); :meth:`close` zeroes the params."""

    device = "cpu"

    def __init__(self, metadata: Metadata, source: str) -> None:
        self.metadata = metadata
        self.source = source
        self._tvm = _tvm()
        self._params: list[Any] = []  # TVM arrays, in the order the function takes them
        self._views: list[Any] = []  # writable numpy views of their memory, to zero them
        self._library: _MemoryLibrary | None = None
        self._module: Any = None
        self._vm: Any = None
        self._fn: Any = None

    def _param(self, shape: Sequence[int], dtype: str) -> memoryview:
        """A new TVM array for the next param; the bytes to fill it with."""
        import numpy as np

        array = self._tvm.runtime.empty(tuple(shape), dtype, self._tvm.cpu())
        view = np.from_dlpack(array)
        self._params.append(array)
        self._views.append(view)
        return memoryview(view.reshape(-1).view(np.uint8).data)

    def _start(self, module: Any) -> None:
        """Bind the loaded executable: a VM on the CPU and the metadata's function, whose arity must be
        its inputs plus its params (a mismatch is a load error, not one on every request)."""
        from tvm import relax

        self._module = module
        try:
            self._vm = relax.VirtualMachine(module, self._tvm.cpu())
            self._fn = self._vm[self.metadata.function]
        except Exception as exc:
            raise FormatError(f"{self.source}: no function {self.metadata.function!r} in the executable "
                              f"({one_line(exc)[:120]})") from None  # fmt: skip
        arity = getattr(self._vm, "_get_function_arity", None)
        want = len(self.metadata.inputs) + len(self.metadata.params)
        if arity is not None and (got := int(arity(self.metadata.function))) != want:
            raise FormatError(f"{self.source}: {self.metadata.function}() takes {got} arguments, but "
                              f"{METADATA} lists {len(self.metadata.inputs)} inputs and "
                              f"{len(self.metadata.params)} params")  # fmt: skip

    def run(self, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, Any]:
        """The model's outputs (all, or those named) as numpy arrays, for numpy ``inputs`` by name."""
        import numpy as np

        if self._fn is None:
            raise UsageError(f"{self.source}: the TVM module is closed")
        names = [t.name for t in self.metadata.inputs]
        missing, unknown = [n for n in names if n not in inputs], [n for n in inputs if n not in names]
        if missing or unknown:
            raise UsageError(f"{self.source}: inputs {names} are needed (missing {missing}, unknown {unknown})")
        wanted = list(outputs) if outputs is not None else [t.name for t in self.metadata.outputs]
        declared = [t.name for t in self.metadata.outputs]
        if any(n not in declared for n in wanted):
            raise UsageError(f"{self.source}: outputs are {declared}, not {[n for n in wanted if n not in declared]}")
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(inputs[n])) for n in names]
        result = self._fn(*args, *self._params)
        results = [result] if isinstance(result, self._tvm.runtime.Tensor) else list(result)
        if len(results) != len(declared):
            raise UsageError(f"{self.source}: the function returned {len(results)} tensors, "
                             f"{METADATA} declares {len(declared)}")  # fmt: skip
        by_name = dict(zip(declared, results, strict=True))
        return {n: by_name[n].numpy() for n in wanted}

    __call__ = run

    def close(self) -> None:
        """Drop the executable (TVM unloads its library), zero every param array, then zero and close
        the memory file that held the library. Safe to call twice."""
        self._fn = self._vm = self._module = None
        for view in self._views:
            view.reshape(-1).view("uint8").fill(0)
        self._views, self._params = [], []
        library, self._library = self._library, None
        if library is not None:
            if library.fd is not None and library.mapped():
                import gc

                gc.collect()  # a reference cycle may still hold the library: only then worth a collection
            library.release()

    def __enter__(self) -> Module:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- loading


def load(
    path: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> Module:
    """A TVM model from a sealed directory, a sealed bundle of the export directory, or the plain
    export directory itself (then ``identity`` is not used, and ``trusted_signers`` refuses it)."""
    p = Path(path)
    if p.is_dir() and not _sealed_directory(p):
        if trusted_signers:
            raise UsageError(f"{p} is not sealed, so it carries no signature")
        return module_from_plain(p)
    if not p.exists():
        raise UsageError(f"{p} does not exist")
    ident = resolve_identity(identity)
    if p.is_dir():

        def member(m: Path, cache: dict[bytes, bytearray]) -> Artifact:
            return open_artifact(m, ident, trusted_signers=trusted_signers, dek_cache=cache)

        with open_directory(p, member) as arts:
            return module_from_artifacts(arts, str(p), directory=True)
    with open_bundle(p, ident, trusted_signers=trusted_signers) as bundle:
        return module_from_artifacts({p.name: bundle}, str(p), directory=False)


def _sealed_directory(path: Path) -> bool:
    return any(is_bundle(p) for p in path.iterdir() if p.is_file())


def module_from_artifacts(artifacts: Mapping[str, Artifact], source: str, *, directory: bool) -> Module:
    """A TVM model from unlocked artifacts: the members of a sealed directory by relative path
    (``directory``), or one sealed bundle of the export directory. ``source`` names it in errors.
    Everything decrypted along the way is wiped, on failure too."""
    tvm = _tvm()
    if directory:
        found = {role: artifacts.get(role) for role in (LIBRARY, PARAMS, METADATA)}
        missing = [role for role, art in found.items() if art is None]
        if missing:
            raise FormatError(f"{source} is not a TVM export: it has no {', '.join(missing)}")

        def read(role: str) -> bytearray:
            art = found[role]
            if not isinstance(art, SealedBundle):
                raise FormatError(f"{source}: {role} is not a sealed bundle member")
            return art.read()

        params_art = found[PARAMS]
    else:
        if len(artifacts) != 1 or not isinstance(bundle := next(iter(artifacts.values())), SealedBundle):
            raise FormatError(f"{source} must be one sealed bundle of a TVM export directory")
        names = _roles(bundle.names(), source)

        def read(role: str) -> bytearray:
            return bundle.read(names[role])

        params_art = None
    meta_bytes = read(METADATA)
    try:
        metadata = parse_metadata(meta_bytes, source)
    finally:
        keys.wipe(meta_bytes)
    model = Module(metadata, source)
    module = None
    try:
        if isinstance(params_art, SealedSafetensors):
            _decrypt_params(model, params_art, source)
        else:
            data = read(PARAMS)
            try:
                _copy_params(model, data, source)
            finally:
                keys.wipe(data)
        code = read(LIBRARY)
        try:
            model._library = _MemoryLibrary(code)
        finally:
            keys.wipe(code)
        module = _load_library(tvm, model._library.path, source)
        _check_mapped(model._library, source)
        model._start(module)
    except BaseException as exc:
        # The library is unloaded (and its memory file zeroed) only once nothing holds the executable:
        # neither this frame nor the frames of the failed call, which the traceback keeps alive.
        module = None
        exc.__traceback__ = None
        model.close()
        raise
    return model


def _check_mapped(library: _MemoryLibrary, source: str) -> None:
    """TVM must have mapped *our* memory file: ``dlopen`` returns a library already loaded under the
    same path name without opening the file, which would be another model's code."""
    if not library.mapped():
        raise FormatError(f"{source}: the compiled library was not loaded from its own memory file "
                          "(a library under the same /proc/self/fd path is still loaded)")  # fmt: skip


def _roles(names: list[str], source: str) -> dict[str, str]:
    """Which bundle member is which file: ``model.so`` or ``DIR/model.so`` (a bundle of a directory may
    name its files under the directory's name), all three under one prefix."""
    out: dict[str, str] = {}
    for role in (LIBRARY, PARAMS, METADATA):
        matches = [n for n in names if n == role or n.endswith("/" + role)]
        if len(matches) != 1:
            raise FormatError(f"{source} must hold exactly one {role}, found {len(matches)}")
        out[role] = matches[0]
    if len({n[: -len(role)] for role, n in out.items()}) != 1:
        raise FormatError(f"{source}: {', '.join(out.values())} are not in one directory")
    return out


def _param_entries(names: Sequence[str], listed: Mapping[str, Any], source: str) -> Iterator[tuple[str, Any]]:
    """Each param the metadata names, with its entry in the params file; a missing or unlisted tensor
    is an error (the function would get the wrong arguments)."""
    missing = [n for n in names if n not in listed]
    extra = [n for n in listed if n not in set(names)]
    if missing or extra:
        raise FormatError(f"{source}: {PARAMS} does not match {METADATA}'s params "
                          f"(missing {missing[:5]}, not listed {extra[:5]})")  # fmt: skip
    for name in names:
        yield name, listed[name]


def _numpy_dtype(dtype: Any, name: str, source: str) -> str:
    known = lookup(dtype)
    if known is None or known.numpy is None:
        raise FormatError(f"{source}: param {name[:80]!r} has dtype {str(dtype)[:20]!r}, which TVM arrays "
                          "from numpy do not support here")  # fmt: skip
    return known.numpy


def _decrypt_params(model: Module, art: SealedSafetensors, source: str) -> None:
    """Each param decrypted straight into the TVM array it becomes (no other plaintext copy)."""
    from modelseal.memory import arena

    entries = {e.name: e for e in art.entries}
    jobs = []
    for name, entry in _param_entries(model.metadata.params, entries, source):
        dtype = _numpy_dtype(entry.info["dtype"], name, source)
        jobs.append((entry, model._param(entry.info["shape"], dtype)))
    art.decrypt_many(jobs, None, arena.prefault)


def _copy_params(model: Module, data: bytes | bytearray | memoryview, source: str) -> None:
    """Each param copied out of a whole params file in memory (the caller wipes it) into its TVM array."""
    what = f"{source}: {PARAMS}"
    header, start = parse_plain_header(data, what)
    entries = {e["name"]: e for e in tensor_entries(header, what)}
    view = memoryview(data).cast("B")
    for name, e in _param_entries(model.metadata.params, entries, source):
        begin, end = e["offsets"]
        if start + end > len(view):
            raise FormatError(f"{what}: tensor {name[:80]!r} runs past the end of the file")
        model._param(e["shape"], _numpy_dtype(e["dtype"], name, source))[:] = view[start + begin : start + end]


def module_from_plain(path: str | os.PathLike[str]) -> Module:
    """A TVM model from a plain (unsealed) export directory, loaded from its files."""
    tvm = _tvm()
    root = Path(path)
    for role in (LIBRARY, PARAMS, METADATA):
        if not (root / role).is_file():
            raise FormatError(f"{root} is not a TVM export: it has no {role}")
    try:
        metadata_bytes, params = (root / METADATA).read_bytes(), (root / PARAMS).read_bytes()
    except OSError as exc:
        raise UsageError(f"{root}: cannot read the export: {exc.strerror}") from None
    model = Module(parse_metadata(metadata_bytes, str(root)), str(root))
    try:
        _copy_params(model, params, str(root))
        model._start(_load_library(tvm, str(root / LIBRARY), str(root)))
    except BaseException:
        model.close()
        raise
    return model


# ----------------------------------------------------------------------------------------- export

TensorDecl = tuple[str, Sequence[int | None]]  # (V2 datatype, shape: -1 or None for a variable dim)


def export(
    executable: Any,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    inputs: Mapping[str, TensorDecl],
    outputs: Mapping[str, TensorDecl],
    function: str = "main",
    overwrite: bool = False,
) -> Path:
    """Write what gets sealed: ``out_dir/model.so`` (``executable.export_library``, which runs the
    system's C compiler), ``params.safetensors`` and ``metadata.json``. ``executable`` is what
    ``tvm.compile(mod, target="llvm")`` returns; its ``function`` is called as
    ``function(*inputs, *params)``, in the order of ``inputs`` then ``params`` (numpy arrays or TVM
    arrays, by name). The directory appears complete or not at all. Then:
    ``modelseal seal out_dir sealed_dir -r RECIPIENT``."""
    import numpy as np
    from safetensors.numpy import save

    def decls(items: Mapping[str, TensorDecl], what: str) -> tuple[TensorInfo, ...]:
        out = []
        for name, decl in items.items():
            if not (isinstance(decl, tuple | list) and len(decl) == 2):
                raise UsageError(f"{what} {name!r} must be (datatype, shape), e.g. ('FP32', [-1, 4])")
            datatype, shape = decl
            out.append(TensorInfo(name, datatype, tuple(None if d is None or d == -1 else int(d) for d in shape)))
        return tuple(out)

    metadata = Metadata(function, decls(inputs, "input"), decls(outputs, "output"), tuple(params))
    text = metadata.to_json()
    parse_metadata(text, "export")  # the same checks a loader makes: refuse now what could not load later
    arrays = {name: np.ascontiguousarray(v.numpy() if hasattr(v, "numpy") else np.asarray(v))
              for name, v in params.items()}  # fmt: skip
    mode = atomicfile.default_mode()
    with atomicfile.directory(out_dir, atomicfile.default_mode(directory=True), overwrite=overwrite) as tmp:
        executable.export_library(str(tmp / LIBRARY))
        os.chmod(tmp / LIBRARY, mode)
        atomicfile.write_bytes(tmp / PARAMS, save(arrays), mode)
        atomicfile.write_bytes(tmp / METADATA, text, mode)
    return Path(out_dir)
