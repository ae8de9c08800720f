"""CUDA-graph capture of the decode step, one graph per (batch bucket, kv_len bucket), captured lazily.

A decode step of a small model is hundreds of tiny kernels: launched one by one from Python the GPU waits
on the CPU. A captured graph replays them with one launch. Graphs need static shapes and addresses, so
the engine rounds the batch up to a bucket (idle rows are harmless dummies), rounds kv_len up to a bucket
(extra cache positions are masked out), and feeds the graph from its persistent token/position buffers.

All graphs share one memory pool (they never run concurrently) and write their logits into one shared
output buffer, so memory does not grow with the number of graphs; at most `max_graphs` are kept (LRU).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable

import torch

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def batch_bucket(n: int) -> int:
    """Smallest bucket >= n: fine steps while small, then multiples of 128 past 512."""
    for b in _BATCH_BUCKETS:
        if b >= n:
            return b
    return -(-n // 128) * 128


def kv_bucket(n: int, max_len: int) -> int:
    """Round a kv_len up: to a multiple of 128 up to 2048, then to 1/8 of the enclosing power of two (reads at
    most 12.5% extra cache), never past max_len."""
    step = 128 if n <= 2048 else 1 << (n.bit_length() - 4)
    return min(-(-n // step) * step, max_len)


class DecodeGraphs:
    """run(batch, kv_len) → logits [batch, V]: replays (capturing first if new) `step(batch, kv_len, out)`,
    which must read only persistent buffers and write its logits into `out` ([batch, V] view of one buffer)."""

    def __init__(self, step: Callable[[int, int, torch.Tensor], None], max_batch: int, vocab: int,
                 dtype: torch.dtype, device: torch.device, max_graphs: int = 96):
        self.step, self.max_graphs = step, max_graphs
        self.logits = torch.empty(max_batch, vocab, dtype=dtype, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple[int, int], torch.cuda.CUDAGraph] = OrderedDict()
        self.captures = 0
        self.failed: str | None = None

    def run(self, batch: int, kv_len: int) -> torch.Tensor | None:
        """Logits [batch, V], or None if capture is impossible for this model (caller runs eagerly)."""
        if self.failed:
            return None
        key = (batch, kv_len)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(batch, kv_len)
            if graph is None:
                return None
        else:
            self.graphs.move_to_end(key)
        graph.replay()
        return self.logits[:batch]

    def _capture(self, batch: int, kv_len: int) -> torch.cuda.CUDAGraph | None:
        out = self.logits[:batch]
        # Warm up on a side stream (lazy cuBLAS/Triton init must not happen during capture). The warm-up
        # writes the same K/V the real step will write for the same inputs, so running rows are unharmed.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(batch, kv_len, out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(batch, kv_len, out)
        except Exception as err:  # e.g. an op that syncs with the host (data-dependent shapes)
            torch.cuda.synchronize()
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"CUDA-graph capture of the decode step failed ({self.failed}); decoding eagerly")
            self.graphs.clear()
            return None
        self.captures += 1
        self.graphs[(batch, kv_len)] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return graph

    def clear(self) -> None:
        """Drop every graph (call after the model's parameters were replaced, not merely updated in place)."""
        self.graphs.clear()
        self.failed = None
