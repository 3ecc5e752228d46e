"""What every bench prints first: the CPU facts that decide AES-GCM speed on this run's machine.

Sessions land on different CPUs of one VM kind, and OpenSSL's fastest AES-GCM needs VAES with AVX-512:
without it one core decrypts at a quarter of the speed (docs/benchmarks.md, "Machines"). Figures are
only comparable between runs that print the same line.
"""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """The CPU facts that decide AES-GCM speed (OpenSSL's fastest GCM needs VAES with AVX-512)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("aes", "vaes", "vpclmulqdq", "avx2", "avx512f")
    return (
        f"{model}, {os.cpu_count()} CPUs, {' '.join(f for f in wanted if f in flags) or 'no AES flags'}, "
        f"Linux {platform.release()}"
    )
