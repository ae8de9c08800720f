"""Which blocks of a PagedKVCache are free, and how many sequences hold each one.

The engine (engine.py) decides what a sequence holds; this class only keeps the books: a free list, and a
reference count per block (> 1 for a prompt's full blocks shared by the samples of one request, which only
read them). A block returns to the free list when its last holder releases it.
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcounts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest-numbered block is taken first
        self.peak = 0
        """Most blocks in use at once."""

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n free blocks, each now held once."""
        if n > len(self._free):
            raise RuntimeError(f"allocating {n} KV blocks with {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for block in blocks:
            self.refcounts[block] = 1
        self.peak = max(self.peak, self.in_use)
        return blocks

    def fork(self, blocks: list[int]) -> list[int]:
        """Hold `blocks` (already held by someone) once more; returns a copy of the list for the new holder."""
        for block in blocks:
            if not self.refcounts[block]:
                raise RuntimeError(f"forking KV block {block}, which is free")
            self.refcounts[block] += 1
        return list(blocks)

    def release(self, blocks: list[int]) -> None:
        """Drop one hold of each block; blocks nobody holds any more become free."""
        for block in blocks:
            if not self.refcounts[block]:
                raise RuntimeError(f"releasing KV block {block}, which is free")
            self.refcounts[block] -= 1
            if not self.refcounts[block]:
                self._free.append(block)
