"""How the server runs onnxruntime on CPU so that memory comes back after a large request.

onnxruntime's CPU arena keeps the peak of the largest call for the life of the process (1.7 GB
after one 12 MP image) and never shrinks; without the arena, memory goes back to glibc but every
call faults its buffers in afresh: ~20% slower from 1 MP up (docs/benchmark_memory.md).
So two sessions of the same graph: calls up to ARENA_MAX_PIXELS (the dynamic batcher's usual
batches) run with the arena, whose size that bounds; larger ones run without it, and glibc's
heap is trimmed after each. serving/onnx_model.py (inside the python-backend stub) and the
memory benchmark share this, so the benchmark measures what the server runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import threading

import numpy as np
import onnxruntime as ort

# 8 images of 512x1024: the largest batch the shipped config's dynamic batcher makes of the
# project's usual image size. The arena then keeps at most what such a batch needs (~0.5 GB);
# one call above this costs ~85 MiB per megapixel while it runs, and nothing after. The
# `arena_max_pixels` config parameter overrides it (lower: less kept, those calls ~20% slower).
ARENA_MAX_PIXELS = 8 * 512 * 1024
# glibc is asked again this long after a large call, for what is freed only after the response
# is sent (the stub copies the outputs into shared memory once execute has returned): without
# this second malloc_trim, the stub kept ~40 MiB after a 16 MP `segment` request.
TRIM_DELAY_S = 1.0


def session_options(arena: bool = True, threads: int | None = None, profile_prefix: str = "") -> ort.SessionOptions:
    """The one place SessionOptions are made: the server, export's parity check, the benchmarks."""
    options = ort.SessionOptions()
    # One Triton instance per process; leave threads to onnxruntime unless told (SERVING_ORT_THREADS).
    options.intra_op_num_threads = int(os.environ.get("SERVING_ORT_THREADS", "0")) if threads is None else threads
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return options


def cpu_session(
    model: bytes | str | os.PathLike, threads: int | None = None, arena: bool = True, profile_prefix: str = ""
) -> ort.InferenceSession:
    """A CPU session of a graph given as bytes or a path."""
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(
        source, session_options(arena, threads, profile_prefix), providers=["CPUExecutionProvider"]
    )


def malloc_trim():
    """glibc's malloc_trim as a callable `trim(pad)`, or a no-op where the C library has none (musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return lambda _pad: 0


def pixels(feeds: dict[str, np.ndarray]) -> int:
    """N*H*W of the first input, an [N, H, W, C] image batch."""
    return math.prod(next(iter(feeds.values())).shape[:3])


class MemorySession:
    """The graph's two CPU sessions, chosen per call by its pixels; `run` as InferenceSession's."""

    def __init__(self, path: str, arena_max_pixels: int = ARENA_MAX_PIXELS):
        self.path = path
        self.arena = cpu_session(path, arena=True)
        # A second copy of the weights and its own thread pool, made on the first large call only.
        self._no_arena: ort.InferenceSession | None = None
        self.arena_max_pixels = arena_max_pixels
        self.trim = malloc_trim()

    @property
    def no_arena(self) -> ort.InferenceSession:
        if self._no_arena is None:
            self._no_arena = cpu_session(self.path, arena=False)
        return self._no_arena

    def get_inputs(self):
        return self.arena.get_inputs()

    def run(self, outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if pixels(feeds) <= self.arena_max_pixels:
            return self.arena.run(outputs, feeds)
        try:
            return self.no_arena.run(outputs, feeds)
        finally:
            self.trim(0)  # the activations; the outputs are returned, and freed later
            later = threading.Timer(TRIM_DELAY_S, self.trim, (0,))
            later.daemon = True
            later.start()
