"""Host (CPU RAM) housekeeping shared by the layers that compile or load."""

from __future__ import annotations

import ctypes


def release_host_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`); a no-op elsewhere.

    XLA's compiler and the checkpoint reader free what they allocate, but
    glibc keeps the pages in its arenas, where they still count as resident
    memory and stack under the next peak (the first run of a compiled step).
    Called after each compile and after loading a checkpoint.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
