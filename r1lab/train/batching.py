"""Group-aware batch arithmetic and sequence packing.

- `pack_sequences` packs variable-length (prompt + completion) sequences into rows of at most `max_tokens`
  tokens (first-fit decreasing), with positions restarting per document and doc ids that the model turns
  into per-document causal attention (model/attention.py: one SDPA call per group of equal-length runs),
  so no compute is spent on padding, documents never see each other and memory grows linearly with the pack.
- `unpack_to_sequences` takes any per-token [R, L] result (log-probs, entropies) back to per-sequence
  tensors; the loss is then computed on ordinary padded [B, T] tensors (cheap) while the forward ran packed.
- `micro_batches_by_tokens` groups sequences for padded (unpacked) forwards under a token budget.
- `split_minibatches` cuts a rollout of num_groups × group_size completions into optimizer minibatches
  for any counts, never demanding that a batch divide by the group size; `minibatch_plan` gives every
  rank of a torchrun job the same number of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from r1lab.distributed import DistInfo, max_across_ranks


@dataclass
class PackedBatch:
    """R packed rows of length L (rows shorter than L are right-padded).

    input_ids [R, L] long; pad token 0.
    positions [R, L] long: 0, 1, ... restarting at every document; 0 on padding.
    doc_ids [R, L] long: the original sequence index of every token (unique across the whole pack), -1 on
        padding; pass to the model, which lets a token attend only to earlier tokens of the same doc id.
    targets [R, L] long: the next token of the same document; -1 at a document's last token and on padding
        (token_logprobs gives 0 there).
    loss_mask [R, L] bool: loss_mask[r, j] says whether *predicting* targets[r, j] counts, i.e. the caller's
        per-token mask shifted left by one (a completion token's log-prob sits at the position before it).
    seq_index: original index of each sequence in this batch, in placement order.
    spans: (row, start, length) of each of those sequences, aligned with seq_index.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    seq_index: list[int]
    spans: list[tuple[int, int, int]]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return sum(n for _, _, n in self.spans)

    def to(self, device) -> "PackedBatch":
        t = {k: getattr(self, k).to(device) for k in ("input_ids", "positions", "doc_ids", "targets", "loss_mask")}
        return PackedBatch(**t, seq_index=self.seq_index, spans=self.spans)


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity; longest items placed first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def pack_sequences(
    seqs: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int | bool]] | None,
    max_tokens: int,
    *,
    rows_per_batch: int = 1,
) -> list[PackedBatch]:
    """Pack token sequences into rows of at most max_tokens tokens; rows_per_batch rows per PackedBatch.

    seqs[i]: the token ids of sequence i (prompt + completion); loss_masks[i]: same length, 1 on the tokens
    whose log-prob the loss uses (the completion), None = every token after the first. A sequence longer
    than max_tokens is an error (raise the budget; it must cover the longest prompt + completion).
    With rows_per_batch=1 every batch is one row [1, L <= max_tokens] with no padding at all.
    """
    if max_tokens < 1 or rows_per_batch < 1:
        raise ValueError(f"max_tokens and rows_per_batch must be >= 1, got {max_tokens}, {rows_per_batch}")
    lengths = [len(s) for s in seqs]
    if loss_masks is not None and len(loss_masks) != len(seqs):
        raise ValueError(f"{len(loss_masks)} loss masks for {len(seqs)} sequences")
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"sequence {i} is empty")
        if n > max_tokens:
            raise ValueError(f"sequence {i} has {n} tokens, more than the packing budget max_tokens={max_tokens}")
        if loss_masks is not None and len(loss_masks[i]) != n:
            raise ValueError(f"sequence {i} has {n} tokens but its loss mask has {len(loss_masks[i])}")
    rows = _first_fit_decreasing(lengths, max_tokens)
    batches = []
    for first in range(0, len(rows), rows_per_batch):
        group = rows[first : first + rows_per_batch]
        L = max(sum(lengths[i] for i in row) for row in group)
        shape = (len(group), L)
        input_ids = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        doc_ids = torch.full(shape, -1, dtype=torch.long)
        targets = torch.full(shape, -1, dtype=torch.long)
        loss_mask = torch.zeros(shape, dtype=torch.bool)
        seq_index, spans = [], []
        for r, row in enumerate(group):
            start = 0
            for i in row:
                n = lengths[i]
                ids = torch.as_tensor(list(seqs[i]), dtype=torch.long)
                input_ids[r, start : start + n] = ids
                positions[r, start : start + n] = torch.arange(n)
                doc_ids[r, start : start + n] = i
                targets[r, start : start + n - 1] = ids[1:]
                if loss_masks is None:
                    lm = torch.ones(n, dtype=torch.bool)
                else:
                    lm = torch.as_tensor(list(loss_masks[i])).bool()
                loss_mask[r, start : start + n - 1] = lm[1:]
                seq_index.append(i)
                spans.append((r, start, n))
                start += n
        batches.append(PackedBatch(input_ids, positions, doc_ids, targets, loss_mask, seq_index, spans))
    return batches


def unpack_to_sequences(
    values: torch.Tensor, batch: PackedBatch, *, loss_tokens_only: bool = False
) -> list[torch.Tensor]:
    """Per-token values [R, L, ...] of a packed batch → one tensor per sequence, in batch.seq_index order.

    Default: the sequence's slice [n, ...], position-aligned (unpack(batch.input_ids) gives the tokens back;
    for target-aligned values such as log-probs, entry j refers to token j + 1 and the last entry is
    meaningless). loss_tokens_only=True: only the entries where batch.loss_mask is set, i.e. for log-probs
    exactly the completion tokens' log-probs in order, aligned with the rollout's completion log-probs.
    Differentiable (plain slicing).
    """
    out = []
    for r, start, n in batch.spans:
        v = values[r, start : start + n]
        if loss_tokens_only:
            v = v[batch.loss_mask[r, start : start + n].to(values.device)]
        out.append(v)
    return out


def micro_batches_by_tokens(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped so that each padded micro-batch (count × its longest length) fits token_budget.

    Sequences are sorted longest first (so each micro-batch pads little) and filled greedily; indices
    come back in that order. A sequence longer than the budget on its own gets a micro-batch of one
    (it cannot be split); every index appears exactly once.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Sorted descending, so the first member is the longest: cost = (count + 1) × first's length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def split_minibatches(
    num_groups: int,
    group_size: int,
    num_minibatches: int | None = None,
    minibatch_size: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Split N = num_groups × group_size completions (prompt-major: completion j of group g is g·G + j)
    into optimizer minibatches; returns the completion indices of each.

    Give num_minibatches k, or minibatch_size m in completions (then k = ceil(N / m)). Rules:
    1. k divides num_groups → every minibatch holds num_groups / k whole groups.
    2. otherwise the N completions are cut into k contiguous pieces whose sizes differ by at most one; a
       group may then straddle two minibatches. That is harmless: advantages are computed over the whole
       rollout before any split, so the split only decides which completions share an optimizer step.
    No divisibility is ever required; only k > N (an empty minibatch) is an error.
    With a generator, group order (rule 1) or completion order (rule 2) is shuffled first, as R1's "randomly
    split into 16 minibatches"; without one the split is deterministic.
    """
    N = num_groups * group_size
    if num_groups < 1 or group_size < 1:
        raise ValueError(f"need num_groups >= 1 and group_size >= 1, got {num_groups}, {group_size}")
    if (num_minibatches is None) == (minibatch_size is None):
        raise ValueError("pass exactly one of num_minibatches or minibatch_size")
    if minibatch_size is not None:
        if minibatch_size < 1:
            raise ValueError(f"minibatch_size must be >= 1, got {minibatch_size}")
        num_minibatches = math.ceil(N / minibatch_size)
    k = num_minibatches
    if not 1 <= k <= N:
        raise ValueError(f"cannot split {N} completions ({num_groups} groups × {group_size}) into {k} minibatches")
    if num_groups % k == 0:
        groups = torch.randperm(num_groups, generator=generator).tolist() if generator else list(range(num_groups))
        per = num_groups // k
        chunks = [groups[b * per : (b + 1) * per] for b in range(k)]
        return [[g * group_size + j for g in chunk for j in range(group_size)] for chunk in chunks]
    order = torch.randperm(N, generator=generator).tolist() if generator else list(range(N))
    base, extra = divmod(N, k)
    out, start = [], 0
    for b in range(k):
        size = base + (b < extra)
        out.append(order[start : start + size])
        start += size
    return out


def check_whole_groups(prompt_index: Sequence[int], group_size: int) -> None:
    """The invariant that makes group advantages local: the rank's completions are prompt-major, in whole
    groups of exactly group_size completions of one prompt each. Raises AssertionError otherwise."""
    n = len(prompt_index)
    assert n % group_size == 0, f"{n} completions are not whole groups of {group_size}"
    seen: set[int] = set()
    for g in range(n // group_size):
        members = set(prompt_index[g * group_size : (g + 1) * group_size])
        assert len(members) == 1, f"group {g} mixes prompts {sorted(members)}"
        assert not members & seen, f"prompt {prompt_index[g * group_size]} is split across groups"
        seen |= members


def minibatch_plan(n_groups: int, group_size: int, num_minibatches: int, info: DistInfo,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """split_minibatches of this rank's completions into the same number of optimizer steps on every rank
    (min(num_minibatches, fewest completions on any rank that has some), at least 1); a rank with no groups
    gets that many empty minibatches (it still joins every step with dummy passes). A collective."""
    n = n_groups * group_size
    fewest = -max_across_ranks(-n if n else -(10**12), info)  # min over ranks with completions
    k = max(1, min(num_minibatches, fewest))
    if n == 0:
        return [[] for _ in range(k)]
    return split_minibatches(n_groups, group_size, num_minibatches=k, generator=generator)
