"""Shared helpers for the benchmarks: device, synchronized timing, result annotation, memory."""
from __future__ import annotations

import contextlib
import itertools

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def autocast(dtype: torch.dtype):
    """Autocast to `dtype` on the bench device; off for fp32 (CPU runs measure plain fp32)."""
    return torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def run(benchmark, fn, *, calls: int = 1, rounds: int | None = None, warmup: int | None = None) -> float:
    """Time fn with pytest-benchmark; returns the median seconds per call.

    Each round makes ``calls`` back-to-back calls and synchronizes once at its end (on CUDA), so the
    host runs ahead of the GPU as it does in training: per-call launch latency is not counted as
    GPU time. pytest-benchmark divides by ``calls``, so its stats are per call too.
    """
    count = itertools.count(1)

    def target():
        fn()
        if next(count) % calls == 0:
            sync()

    rounds = rounds or (20 if CUDA else 10)
    warmup = warmup if warmup is not None else (3 if CUDA else 2)
    benchmark.pedantic(target, rounds=rounds, iterations=calls, warmup_rounds=warmup)
    benchmark.extra_info["calls_per_round"] = calls
    return benchmark.stats.stats.median


_CAPTURE_STREAM = None


@contextlib.contextmanager
def capture_stream():
    """Run the block on the stream run_graphed() captures on (a no-op on CPU). Autograd runs each
    backward op on its forward op's stream, so a graph that is only backward (bench mode "bwd") must
    have its forward built here to be captured."""
    global _CAPTURE_STREAM
    if not CUDA:
        yield
        return
    if _CAPTURE_STREAM is None:
        _CAPTURE_STREAM = torch.cuda.Stream()
    _CAPTURE_STREAM.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(_CAPTURE_STREAM):
        yield _CAPTURE_STREAM
    torch.cuda.current_stream().wait_stream(_CAPTURE_STREAM)


def run_graphed(benchmark, fn, *, calls: int = 10, rounds: int = 20) -> float:
    """Like run(), but on CUDA time replays of a CUDA graph holding ``calls`` calls of fn: device time
    without per-launch host cost, which on a slow host hides the kernels (an eager call of a small op
    costs tens of microseconds of CPU). extra_info["cuda_graph"] says which timing was taken; a
    provider that cannot be captured is timed eagerly. On CPU this is run()."""
    if not CUDA:
        return run(benchmark, fn)
    with capture_stream() as stream:                # warm up (autotuning, compilation) outside the capture
        for _ in range(3):
            fn()
    sync()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            for _ in range(calls):
                fn()
    except RuntimeError as e:
        sync()
        benchmark.extra_info["cuda_graph"] = False
        benchmark.extra_info["cuda_graph_error"] = str(e).splitlines()[0][:200]
        return run(benchmark, fn, calls=calls, rounds=rounds)
    benchmark.pedantic(lambda: (graph.replay(), sync()), rounds=rounds, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(cuda_graph=True, calls_per_round=calls)
    return benchmark.stats.stats.median / calls


def annotate(benchmark, seconds: float, *, flops: float | None = None, images: int | None = None,
             **extra) -> None:
    """extra_info: TFLOP/s from a FLOP count, img/s from an image count, plus anything given."""
    info = dict(extra, seconds_per_call=seconds)
    if flops is not None:
        info["tflops"] = round(flops / seconds / 1e12, 3)
        info["flops"] = flops
    if images is not None:
        info["img_per_s"] = round(images / seconds, 1)
    benchmark.extra_info.update(info)


def saved_activation_bytes(fn, params=()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running fn(), the storage of
    ``params`` excluded: the activation memory of a training step, on any device."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen, alive = {}, []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        alive.append(t)    # hold storages while counting, so no address is reused and counted twice
        return None        # never t itself: a saved output packed as itself forms a cycle gc cannot free

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        out = fn()         # the graph is only measured, never run backward
    del out
    alive.clear()
    return sum(seen.values())
