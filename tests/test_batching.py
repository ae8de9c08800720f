"""Packing keeps every token once within budget and gives the same log-probs as unpacked forwards."""

import random

import pytest
import torch

import r1lab.model as rm
from r1lab.train.batching import micro_batches_by_tokens, pack_sequences, split_minibatches, unpack_to_sequences
from r1lab.train.logprobs import token_logprobs


def _data(n=12, seed=0, vocab=512, lo=3, hi=20):
    rnd = random.Random(seed)
    seqs, masks = [], []
    for _ in range(n):
        prompt, completion = rnd.randint(1, lo + 2), rnd.randint(lo - 2, hi - lo)
        seqs.append([rnd.randrange(1, vocab) for _ in range(prompt + completion)])
        masks.append([0] * prompt + [1] * completion)
    return seqs, masks


@pytest.mark.parametrize("rows_per_batch", [1, 3])
def test_pack_preserves_tokens_boundaries_and_budget(rows_per_batch):
    seqs, masks = _data()
    budget = 32
    batches = pack_sequences(seqs, masks, budget, rows_per_batch=rows_per_batch)
    seen = []
    for b in batches:
        R, L = b.input_ids.shape
        assert L <= budget and R <= rows_per_batch
        for r in range(R):
            assert (b.doc_ids[r] >= 0).sum() <= budget
        for i, seq, (r, start, n) in zip(b.seq_index, unpack_to_sequences(b.input_ids, b), b.spans):
            seen.append(i)
            assert seq.tolist() == seqs[i]  # unpack inverts pack
            assert b.positions[r, start : start + n].tolist() == list(range(n))  # restart per document
            assert (b.doc_ids[r, start : start + n] == i).all()
            assert b.targets[r, start : start + n - 1].tolist() == seqs[i][1:]  # next token, same doc
            assert b.targets[r, start + n - 1] == -1  # nothing to predict across a boundary
            assert b.loss_mask[r, start : start + n - 1].tolist() == [bool(m) for m in masks[i][1:]]
            assert not b.loss_mask[r, start + n - 1]
        pad = b.doc_ids == -1
        assert not b.loss_mask[pad].any() and (b.targets[pad] == -1).all()
        assert b.num_tokens == int((~pad).sum())
    assert sorted(seen) == list(range(len(seqs)))  # every sequence exactly once
    # first-fit decreasing fills rows well: total rows close to the lower bound
    rows = sum(b.input_ids.shape[0] for b in batches)
    assert rows <= -(-sum(map(len, seqs)) // budget) + 1


def test_pack_errors():
    with pytest.raises(ValueError, match="sequence 1 has 5 tokens"):
        pack_sequences([[1, 2], [1, 2, 3, 4, 5]], None, 4)
    with pytest.raises(ValueError, match="loss mask"):
        pack_sequences([[1, 2]], [[1]], 4)
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([[]], None, 4)


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_packed_forward_matches_per_sequence_forwards(preset):
    model = rm.build(rm.preset(preset), seed=0).eval()
    seqs, masks = _data(n=7, seed=1, vocab=model.args.vocab_size)
    batches = pack_sequences(seqs, masks, max_tokens=40, rows_per_batch=2)
    packed = {}
    with torch.no_grad():
        for b in batches:
            lp = token_logprobs(model, b.input_ids, b.targets, b.positions, b.doc_ids, chunk_size=16)
            completions = unpack_to_sequences(lp, b, loss_tokens_only=True)
            for i, full, comp in zip(b.seq_index, unpack_to_sequences(lp, b), completions):
                packed[i] = (full, comp)
        for i, seq in enumerate(seqs):
            ids = torch.tensor([seq])
            lp = token_logprobs(model, ids[:, :-1], ids[:, 1:])[0]
            full, comp = packed[i]
            torch.testing.assert_close(full[:-1], lp, atol=1e-5, rtol=0)
            n_completion = sum(masks[i])
            assert comp.shape == (n_completion,)
            torch.testing.assert_close(comp, lp[-n_completion:], atol=1e-5, rtol=0)


def test_micro_batches_by_tokens():
    # sorted 8(2), 7(4), 5(0), 3(1), 2(3); padded cost = count × longest
    assert micro_batches_by_tokens([5, 3, 8, 2, 7], 16) == [[2, 4], [0, 1, 3]]
    assert micro_batches_by_tokens([20, 3], 10) == [[0], [1]]  # too long alone: its own micro-batch
    lengths = [random.Random(3).randint(1, 50) for _ in range(40)]
    mbs = micro_batches_by_tokens(lengths, 100)
    assert sorted(i for mb in mbs for i in mb) == list(range(40))
    assert all(len(mb) * max(lengths[i] for i in mb) <= 100 for mb in mbs)


def test_split_minibatches_whole_groups_and_even_splits():
    # 4 groups of 3 into 2: whole groups
    assert split_minibatches(4, 3, 2) == [list(range(6)), list(range(6, 12))]
    # 3 groups of 4 into 2: no whole-group split exists → 6 + 6, group 1 straddles
    assert split_minibatches(3, 4, 2) == [list(range(6)), list(range(6, 12))]
    # 5 groups of 2 into 3: sizes differ by at most one
    assert [len(m) for m in split_minibatches(5, 2, 3)] == [4, 3, 3]
    # minibatch_size in completions: 12 / 4 → 3 minibatches of whole groups
    assert split_minibatches(3, 4, minibatch_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [len(m) for m in split_minibatches(8, 8, minibatch_size=24)] == [22, 21, 21]
    # R1: 512 outputs per step = 32 prompts × 16; 16 minibatches of 2 whole groups, shuffled
    mbs = split_minibatches(32, 16, 16, generator=torch.Generator().manual_seed(0))
    assert sorted(i for m in mbs for i in m) == list(range(512))
    assert all(len({i // 16 for i in m}) == 2 and len(m) == 32 for m in mbs)
    assert mbs != split_minibatches(32, 16, 16)
    with pytest.raises(ValueError, match="into 13 minibatches"):
        split_minibatches(3, 4, 13)
    with pytest.raises(ValueError, match="exactly one"):
        split_minibatches(3, 4)
