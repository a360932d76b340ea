"""Linux process-memory counters for the CPU benchmarks (``bench_methods.py``, ``bench_sketch.py``).

The peak of anonymous resident memory above a baseline: ``VmHWM`` (peak resident set) is reset to
the current RSS through ``/proc/self/clear_refs``; file-backed pages (code of libraries first
touched after the reset) are subtracted as ``RssFile + RssShmem``.
"""

from __future__ import annotations

import ctypes
import gc


def libc():
    """glibc, or ``None`` where it cannot be loaded."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM``, ``RssAnon``, ...)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    """Collect garbage, return freed heap to the kernel, and reset ``VmHWM`` to the current RSS."""
    gc.collect()
    lib = libc()
    if lib is not None:
        lib.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_anon_bytes() -> int:
    """Peak resident bytes since :func:`reset_peak`, less the file-backed pages resident now."""
    return (status_kib("VmHWM") - status_kib("RssFile") - status_kib("RssShmem")) * 1024
