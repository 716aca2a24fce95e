"""Running chunked elementwise work: CPU worker threads, row chunks, reusable buffers.

The kernels cut a weight into row chunks and run each chunk's ops here. On CPU the chunks run on
a small pool of worker threads whose torch ops are single-threaded, instead of one thread
issuing ops that each open an OpenMP parallel region: a few hundred regions per weight, each
ending in a barrier, collapse when another process (or the engine's own I/O threads) holds a
core, while independent workers simply share what is free. Torch's intra-op thread count is per
thread once a thread has run an op; workers set theirs to 1.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch

__all__ = ["Scratch", "chunk_rows", "row_chunks", "run_chunks"]


class Scratch:
    """Reusable per-call buffers (one weight's chunks all fit the first chunk's size)."""

    def __init__(self):
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, shape, device) -> torch.Tensor:
        """A buffer of SHAPE and DTYPE on DEVICE, reusing the one called NAME when it is big enough.

        name: the caller's label for the buffer (one per temporary); dtype, shape, device: what
        is wanted. The contents are left as they were: callers overwrite them.
        """
        n = math.prod(shape)
        b = self.bufs.get((name, dtype))
        if b is None or b.numel() < n or b.device != device:
            b = torch.empty(n, dtype=dtype, device=device)
            self.bufs[(name, dtype)] = b
        return b[:n].view(shape)


# elements per row chunk of the elementwise pass, per CPU thread: each thread's share of a chunk
# stays in cache, and per-op overhead (one parallel region per op) does not matter; accelerators
# take up to _GPU_CHUNK elements at once (64M: a 14336x4096 weight in one go)
_CPU_CHUNK = 1 << 19
_GPU_CHUNK = 1 << 26


def chunk_rows(rows: int, cols: int, device: torch.device, align: int = 1) -> int:
    """Rows per chunk of a (ROWS, COLS) weight on DEVICE: cache-sized per CPU worker, up to 64M
    elements on accelerators, a multiple of ALIGN (a block height), at most ROWS rounded up."""
    target = _GPU_CHUNK if device.type != "cpu" else _CPU_CHUNK * (1 if _pool() else max(1, torch.get_num_threads()))
    n = max(1, target // max(cols, 1))
    n = max(align, n // align * align)
    return min(n, -(-rows // align) * align)


def row_chunks(rows: int, step: int) -> Iterator[tuple[int, int]]:
    """(first row, end row) of each chunk of STEP rows, the last one partial, over ROWS rows."""
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


# One pool per thread count asked for, kept for the process's life: a conversion thread never
# finds the pool it took shut down under it by another thread that runs with another count.
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _serial_worker() -> None:
    torch.set_num_threads(1)


def _pool() -> ThreadPoolExecutor | None:
    """The chunk workers for the calling thread's torch thread count (None: run serially)."""
    n = torch.get_num_threads()
    if n <= 1:
        return None
    pool = _POOLS.get(n)
    if pool is not None:
        return pool
    with _POOL_LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            pool = ThreadPoolExecutor(n, thread_name_prefix="streamer-quantize", initializer=_serial_worker)
            barrier = threading.Barrier(n)
            for f in [pool.submit(barrier.wait) for _ in range(n)]:  # start every worker now
                f.result()
            # set_num_threads(1) in the workers also changed the default that threads starting
            # later inherit: give it back (this thread already runs with n)
            torch.set_num_threads(n)
            _POOLS[n] = pool
    return pool


def _thread_scratch() -> Scratch:
    """This thread's reusable CPU buffers (a few chunk-sized tensors, kept between calls)."""
    s = getattr(_LOCAL, "scratch", None)
    if s is None:
        s = _LOCAL.scratch = Scratch()
    return s


def run_chunks(fn: Callable, items: Iterable, device: torch.device) -> list:
    """[fn(item, scratch) for item in ITEMS]: on the CPU workers, or serially (one thread, one
    item) with this thread's buffers, or on accelerators serially with fresh buffers.

    fn: called with one item and a :class:`Scratch` it may use for temporaries; items: the
    chunks (any iterable); device: where the tensors live (CPU work goes to the pool).
    """
    items = list(items)
    if device.type != "cpu":
        scratch = Scratch()
        return [fn(it, scratch) for it in items]
    pool = _pool() if len(items) > 1 else None
    if pool is None:
        return [fn(it, _thread_scratch()) for it in items]
    return list(pool.map(lambda it: fn(it, _thread_scratch()), items))
