"""Giving memory back to the system after a spike (glibc only; a no-op elsewhere).

Decoded images are large, short-lived allocations. glibc's malloc serves a large block from mmap
(returned to the system on free) only above a threshold that it raises, after each such free, up
to 32 MiB: after a few big images, later ones come from the heap, which it rarely shrinks, so a
replica kept gigabytes after one burst of large images. :func:`configure_allocator` pins the
threshold (blocks of 1 MiB and more always come from mmap) and :func:`release_memory` trims
what the heap holds free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_libc = None


def _glibc():  # type: ignore[no-untyped-def]
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt  # noqa: B018 - glibc's, absent elsewhere (musl)
            libc.malloc_trim  # noqa: B018
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def configure_allocator(mmap_threshold: int = 1 << 20, trim_threshold: int = 8 << 20) -> bool:
    """Fixed thresholds instead of glibc's sliding ones; True when applied."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    log.debug("malloc thresholds: mmap %d, trim %d (%s)", mmap_threshold, trim_threshold, ok)
    return ok


def release_memory() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def settle_heap() -> None:
    """Once the models are loaded: collect, then move every object alive into the collector's
    permanent generation. The process holds a few hundred thousand long-lived objects (FastAPI,
    pydantic, numpy, onnx); every full collection walked them all, stalling the event loop for
    tens of milliseconds. At 64 clients on 2 cores (bench/run.py, MNIST v2), freezing them took
    the p99 from 64 to 30 ms and the throughput up by a quarter.

    Then the collector runs less often. Under load the live objects are the connections' and the
    requests' (about 100,000 at 1,024 connections), hardly ever garbage in a cycle: in 8 s of
    translation at 1,024 connections the default thresholds (700, 10, 10) ran 929 young, 85 middle
    and 8 full collections, 0.86 s of the event loop's interpreter lock (11 %), and the full ones
    (55 ms each, a stall for every request) collected nothing. With a young generation of 50,000
    objects, goodput there rose 0-9 % and at 256 connections 10-12 % (two interleaved rounds each).
    Young cycles are still collected within about a second under load (80,000 container objects
    a second there); a cycle that survives into an older generation waits for the rarer
    collections of those (every 20, and every 400, young ones).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


GC_THRESHOLDS = (50_000, 20, 20)
