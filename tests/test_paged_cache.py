"""The paged KV cache (model/cache.PagedKVCache, rollout/blocks.BlockManager, Engine(paged=True)) on CPU:
same tokens as the slotted engine and as full forwards, prompt blocks shared by siblings, preemption that
changes no token, block accounting under random arrivals and aborts, the Triton kernels over block tables
under the interpreter, and the long-rollout benchmark's tiny run."""

from __future__ import annotations

import collections
import json
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_rollout import VOCAB, _model, _prompts, assert_greedy_is_full_forward_argmax
from triton_interpreter import run_interpreted

from r1lab.model import KVCache
from r1lab.model.cache import PagedKVCache
import r1lab.rollout as rollout
from r1lab.rollout import Engine, SamplingParams
from r1lab.rollout.blocks import BlockManager

STOPS = list(range(0, VOCAB, 16))  # 1/16 of the vocabulary: lengths vary



def _tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def check_blocks(engine: Engine) -> None:
    """The engine's block books are consistent: refcounts = holders, free = unheld, a block held twice is a full
    prompt block of siblings at the same logical index, and the device tables map exactly what rows hold."""
    size, blocks = engine.cache.block_size, engine.blocks
    holders = collections.defaultdict(list)  # block → [(sequence, logical index)]
    for row, seq in enumerate(engine.slots):
        table = engine.cache.block_tables[row].tolist()
        if seq is None:
            assert set(table) == {engine.cache.scratch_block}
            continue
        assert seq.slot == row and seq.blocks and seq.fed <= len(seq.blocks) * size  # positions written so far
        assert table[: len(seq.blocks)] == seq.blocks and set(table[len(seq.blocks):]) <= {engine.cache.scratch_block}
        for i, block in enumerate(seq.blocks):
            holders[block].append((seq, i))
    for block in range(blocks.num_blocks):
        assert blocks.refcounts[block] == len(holders[block]), block
        if len(holders[block]) > 1:
            (first, index), *others = holders[block]
            assert index < (len(first.request.prompt) - 1) // size  # a full block of prompt[:-1]: read-only
            assert all(s.request is first.request and i == index for s, i in others)
    assert blocks.num_free == sum(not r for r in blocks.refcounts)
    assert all(not seq.blocks and seq.slot < 0 for seq in engine.waiting)


# ----------------------------------------------------------------------------- the cache itself
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_paged_cache_reads_what_the_slotted_cache_reads(preset, dense, moe):
    """Random writes through shuffled block tables read back like KVCache; idle rows only touch the scratch
    block."""
    args = (dense if preset == "tiny-dense" else moe).args
    gen = torch.Generator().manual_seed(0)
    rows, max_len, size = 5, 37, 4
    slotted = KVCache(args, rows, max_len, torch.float32, "cpu")
    per_row = -(-max_len // size)
    paged = PagedKVCache(args, rows + 1, rows * per_row, size, max_len, torch.float32, "cpu")
    physical = torch.randperm(rows * per_row, generator=gen).view(rows, per_row)
    paged.set_rows(list(range(rows)), physical.tolist())
    width = slotted.layers[0].shape[-1] if args.is_mla else None
    for step in range(3):  # [B, T] distinct positions per row, in random order
        positions = torch.stack([torch.randperm(max_len, generator=gen)[:9] for _ in range(rows)])
        if args.is_mla:
            new = torch.randn(rows, 9, width, generator=gen)
        else:
            new = torch.randn(2, rows, 9, args.num_key_value_heads, args.head_dim, generator=gen)
        slot_ids = torch.tensor([3, 0, 4, 1, 2])
        slotted.write(1, slot_ids, positions, new)
        paged.write(1, slot_ids, positions, new)
    for slot_ids in (None, torch.tensor([4, 2])):
        batch = rows if slot_ids is None else 2
        assert torch.equal(paged.read(1, slot_ids, batch, 30), slotted.read(1, slot_ids, batch, 30))
    flat = paged.flat_index(torch.tensor([0, 5, 36, 12, 7, 3]))
    assert flat.tolist()[:5] == [physical[b, p // size] * size + p % size for b, p in enumerate([0, 5, 36, 12, 7])]
    assert flat[5] // size == paged.scratch_block  # row 5 holds nothing


def test_block_manager_counts_holders():
    manager = BlockManager(6)
    a = manager.allocate(3)
    assert a == [0, 1, 2] and manager.num_free == 3
    b = manager.fork(a[:2]) + manager.allocate(1)
    assert manager.refcounts == [2, 2, 1, 1, 0, 0] and manager.peak == 4
    manager.release(a)
    assert manager.refcounts == [1, 1, 0, 1, 0, 0] and manager.num_free == 3
    manager.release(b)
    assert manager.in_use == 0 and manager.peak == 4
    with pytest.raises(RuntimeError, match="free"):
        manager.release([0])
    with pytest.raises(RuntimeError, match="7 KV blocks with 6 free"):
        manager.allocate(7)


# ----------------------------------------------------------------------------- engine parity
@pytest.mark.parametrize("preset,fast_decode", [("tiny-dense", False), ("tiny-dense", True), ("tiny-moe", False)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_paged_engine_matches_slotted_token_for_token(dense, moe, preset, fast_decode, temperature):
    """fp32, continuous batching over more prompts than rows, n=3 siblings, prompts crossing block
    boundaries: the paged engine gives the slotted engine's tokens and log-probs."""
    model = dense if preset == "tiny-dense" else moe
    prompts = _prompts([5, 2, 9, 14, 1, 7, 11, 3, 33, 17, 8])
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=20, n=3, stop_token_ids=STOPS,
                            seed=3)
    slotted = Engine(model, num_slots=6, max_len=64, fast_decode=fast_decode).generate(prompts, params)
    engine = Engine(model, num_slots=6, max_len=64, fast_decode=fast_decode, paged=True, block_size=4,
                    decode_attention=fast_decode)
    if fast_decode:
        engine.fast.attention_chunks = 3  # the split-K merge over gathered paged K/V
    paged = engine.generate(prompts, params)
    assert _tokens(paged) == _tokens(slotted)
    torch.testing.assert_close(torch.tensor(sum((c.logprobs for c in paged), [])),
                               torch.tensor(sum((c.logprobs for c in slotted), [])), atol=1e-5, rtol=0)
    assert {c.finish_reason for c in paged} == {"stop", "length"}
    assert engine.stats.shared_prompt_blocks > 0
    assert engine.stats.blocks_in_use == 0 and engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_paged_greedy_is_the_full_forward_argmax(dense, moe, preset):
    model = dense if preset == "tiny-dense" else moe
    prompts = _prompts([5, 16, 17, 1, 9])
    engine = Engine(model, num_slots=3, max_len=64, paged=True, block_size=8)
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=14, stop_token_ids=[]))
    assert_greedy_is_full_forward_argmax(model, prompts, out, logprob_atol=1e-4)


def test_siblings_share_the_prompts_full_blocks(dense):
    """n samples of a 23-token prompt (block 4): its 5 full blocks of prompt[:-1] are held once, refcount n;
    the partial sixth block is copied per sample."""
    prompt, n, size = _prompts([23])[0], 6, 4
    engine = Engine(dense, num_slots=8, max_len=64, paged=True, block_size=size, lookahead=0)
    rid = engine.add_request(prompt, SamplingParams(temperature=1.0, max_new_tokens=9, n=n, stop_token_ids=[],
                                                    seed=1), keep=True)
    engine.step()
    check_blocks(engine)
    prompt_blocks = -(-len(prompt) // size)  # 6: positions 0..22
    assert engine.blocks.in_use == 5 + n < n * prompt_blocks
    assert engine.stats.shared_prompt_blocks == 5 * (n - 1) and engine.stats.prefill_tokens == 22
    assert [engine.blocks.refcounts[b] for b in engine.slots[0].blocks] == [n] * 5 + [1]
    while engine.has_unfinished():
        engine.step()
        check_blocks(engine)
    shared = engine.completions(rid)
    alone = Engine(dense, num_slots=8, max_len=64).generate([prompt], SamplingParams(
        temperature=1.0, max_new_tokens=9, n=n, stop_token_ids=[], seed=1))
    assert _tokens(shared) == _tokens(alone) and len({tuple(t) for t in _tokens(shared)}) == n


def test_generate_builds_and_reuses_a_paged_engine(dense):
    rollout.release_engines()
    params = SamplingParams(temperature=0, max_new_tokens=6, n=2, stop_token_ids=[])
    first = rollout.generate(dense, _prompts([7, 3]), params, paged=True)
    engine = rollout._engines[id(dense)]
    assert engine.blocks is not None and engine.max_len == dense.args.max_position_embeddings
    again = rollout.generate(dense, _prompts([7, 3]), params, paged=True)
    assert rollout._engines[id(dense)] is engine and _tokens(again) == _tokens(first)
    assert _tokens(first) == _tokens(rollout.generate(dense, _prompts([7, 3]), params))  # a slotted engine
    rollout.release_engines()


# ----------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("preset,lookahead", [("tiny-dense", 0), ("tiny-dense", 1), ("tiny-moe", 0)])
def test_preemption_changes_no_token(dense, moe, preset, lookahead):
    """A pool of 14 blocks of 4 for 8 rows: sequences are preempted (some several times, some with a sibling
    still running, some after every sibling finished) and recomputed; every token and log-prob equals the
    unconstrained run's."""
    model = dense if preset == "tiny-dense" else moe
    prompts = _prompts([5, 9, 14, 3, 11, 2])
    params = SamplingParams(temperature=1.0, max_new_tokens=30, n=3, stop_token_ids=STOPS[::2], seed=9)
    free = Engine(model, num_slots=8, max_len=64, paged=True, block_size=4, lookahead=lookahead)
    reference = free.generate(prompts, params)
    assert free.stats.preemptions == 0
    tight = Engine(model, num_slots=8, max_len=64, paged=True, block_size=4, num_blocks=14, lookahead=lookahead,
                   fast_decode=preset == "tiny-dense")
    ids = [tight.add_request(p, params, keep=True, seed=params.seed + i) for i, p in enumerate(prompts)]
    while tight.has_unfinished() or tight.inflight:
        tight.step()
        check_blocks(tight)
        assert tight.blocks.in_use <= 14
    out = [c for rid in ids for c in tight.completions(rid)]
    assert _tokens(out) == _tokens(reference)
    torch.testing.assert_close(torch.tensor(sum((c.logprobs for c in out), [])),
                               torch.tensor(sum((c.logprobs for c in reference), [])), atol=1e-5, rtol=0)
    assert tight.stats.preemptions >= 5 and tight.stats.peak_blocks == 14
    assert tight.blocks.num_free == 14 and not any(tight.blocks.refcounts)


def test_random_arrivals_finishes_and_aborts_keep_the_books(dense):
    """Requests of random lengths and n arrive between steps, some are aborted (waiting, running or preempted),
    the pool is small: after every step the books hold (check_blocks); at the end every block is free; every
    request that was not aborted has exactly the tokens it has alone."""
    rng = random.Random(0)
    engine = Engine(dense, num_slots=6, max_len=64, paged=True, block_size=4, num_blocks=24, lookahead=1)
    added, aborted = {}, set()
    for step in range(400):
        if step < 250 and rng.random() < 0.3:
            prompt = _prompts([rng.randint(1, 20)], seed=step)[0]
            params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_new_tokens=rng.randint(1, 30),
                                    n=rng.randint(1, 4), stop_token_ids=STOPS, seed=step)
            added[engine.add_request(prompt, params, keep=True)] = (prompt, params)
        if added and rng.random() < 0.05:
            victim = rng.choice(sorted(added))
            if any(s.finish_reason is None for s in engine.requests[victim].sequences):
                aborted.add(victim)
            engine.abort(victim)
        engine.step()
        check_blocks(engine)
        if step > 250 and not engine.has_unfinished() and not engine.inflight:
            break
    assert not engine.has_unfinished() and engine.blocks.in_use == 0 and not any(engine.blocks.refcounts)
    assert engine.stats.preemptions > 0 and engine.stats.compaction_moves > 0 and len(aborted) >= 2
    reference = Engine(dense, num_slots=16, max_len=64)
    for rid, (prompt, params) in added.items():
        out = engine.completions(rid)
        if rid in aborted:
            assert any(c.finish_reason == "abort" for c in out)
        else:
            assert _tokens(out) == _tokens(reference.generate([prompt], params)), rid


def test_bad_paged_requests_raise_one_line_errors(dense):
    engine = Engine(dense, num_slots=2, max_len=512, paged=True, block_size=16, num_blocks=4)
    with pytest.raises(ValueError, match=r"^prompt 1 has 60 tokens \+ max_new_tokens 5: 5 KV blocks of 16 .*pool's 4"):
        engine.generate([[1, 2], list(range(60))], SamplingParams(max_new_tokens=5))
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match="cannot hold one block"):
        Engine(dense, paged=True, kv_cache_bytes=100)
    block_bytes = 8 * KVCache.bytes_per_token(dense.args, torch.float32)
    sized = Engine(dense, paged=True, block_size=8, kv_cache_bytes=64 * block_bytes)  # 63 blocks + the scratch one
    assert sized.blocks.num_blocks == 63 and sized.num_slots == 16
    assert sized.max_len == dense.args.max_position_embeddings


# ----------------------------------------------------------------------------- Triton kernels, interpreter on CPU
_INTERPRETED = textwrap.dedent('''
    import torch
    from r1lab.rollout import decode_attention as da
    from r1lab.rollout.fast_decode import rope_cache_torch, rope_cache_triton

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for B, H, Hkv, D, size, kv_len in [(5, 4, 2, 16, 16, 256), (3, 14, 2, 64, 4, 130), (2, 6, 6, 32, 8, 70)]:
        per_row = -(-kv_len // size)
        blocks = (B + 1) * per_row + 3
        cache = torch.randn(2, blocks, size, Hkv, D, generator=gen)
        tables = torch.randperm(blocks, generator=gen)[: (B + 1) * per_row].view(B + 1, per_row).to(torch.int32)
        q = torch.randn(B, H, D, generator=gen)
        lengths = torch.randint(1, kv_len + 1, (B,), generator=gen)
        lengths[0], lengths[-1] = kv_len, 1
        work = da.Workspace(B, H, Hkv, D, kv_len, q.device)
        out = da.decode_attention_triton(q, cache, lengths.to(torch.int32), D ** -0.5, work, tables)
        dense = cache[:, tables[:B].long()].flatten(2, 3)  # [2, B, per_row * size, Hkv, D]
        ref = da.decode_attention_reference(q, dense, lengths, D ** -0.5)
        worst = max(worst, (out - ref).abs().max().item())
        # the fused RoPE + cache write to flat positions: kernel = torch twin
        qkv = [torch.randn(B, n * D, generator=gen) for n in (H, Hkv, Hkv)]
        angles = torch.rand(B, D // 2, generator=gen) * 6
        dest = torch.tensor([tables[b, p // size] * size + p % size for b, p in enumerate((lengths - 1).tolist())])
        caches = [cache.clone(), cache.clone()]
        q_kernel = rope_cache_triton(*qkv, angles.cos(), angles.sin(), caches[0], dest, H, Hkv, D)
        q_twin = rope_cache_torch(*qkv, angles.cos(), angles.sin(), caches[1], dest, H, Hkv, D)
        assert (q_kernel - q_twin).abs().max() < 1e-5 and (caches[0] - caches[1]).abs().max() < 1e-5
        assert not torch.equal(caches[0], cache)
    assert worst < 1e-5, worst
    print("paged kernels ok", worst)

    # the whole Triton decode path over a paged cache, inside the engine, with preemption
    import r1lab.model as rm
    from r1lab.rollout import Engine, SamplingParams
    from r1lab.rollout.fast_decode import FastDecoder

    model = rm.build(rm.preset("tiny-dense", initializer_range=0.2), seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 2, 9, 14, 1)]
    params = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=list(range(0, 512, 16)))
    plain = Engine(model, num_slots=3, max_len=32, fast_decode=False).generate(prompts, params)
    engine = Engine(model, num_slots=3, max_len=32, fast_decode=True, paged=True, block_size=4, num_blocks=6)
    engine.fast = FastDecoder(model, engine.cache, use_triton=True, decode_attention=True)
    assert engine.fast.uses_triton and engine.fast.attention_kernel
    out = engine.generate(prompts, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    assert engine.stats.preemptions > 0 and engine.fast.attention_error is None
    print("paged engine ok")
''')


def test_paged_triton_kernels_under_the_interpreter():
    out = run_interpreted(_INTERPRETED)
    assert "paged kernels ok" in out and "paged engine ok" in out


# ----------------------------------------------------------------------------- the benchmark, tiny
def test_long_rollout_benchmark_runs_tiny(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import long_rollout

    long_rollout.main(["--tiny", "--max-new-tokens", "48"])
    results = json.loads(capsys.readouterr().out)
    assert {r["cache"] for r in results["runs"]} == {"paged", "slotted"}
    for run in results["runs"]:
        assert run["tokens"] > 0 and run["tok_per_s"] > 0 and run["mean_concurrency"] > 0
        assert 0 < run["roofline_fraction"]
    paged = next(r for r in results["runs"] if r["cache"] == "paged")
    slotted = next(r for r in results["runs"] if r["cache"] == "slotted")
    assert paged["tokens"] == slotted["tokens"]  # same seeded samples, whatever the cache
    assert paged["mean_concurrency"] > slotted["mean_concurrency"]


# ----------------------------------------------------------------------------- GPU (run with -m gpu)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_cuda_paged_graph_decode_with_preemption_matches_slotted(preset):
    """fp32 on the GPU, CUDA graphs, lookahead 1, Triton fused decode over block tables (dense), a pool small
    enough to preempt: the slotted engine's tokens, and greedy = the argmax of full forwards."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model(preset).cuda()
    prompts = _prompts([5, 2, 9, 14, 1, 7, 11, 3, 30, 6])
    for params in (SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=STOPS),
                   SamplingParams(temperature=1.0, max_new_tokens=20, n=3, stop_token_ids=STOPS, seed=2)):
        slotted = Engine(model, num_slots=8, max_len=64).generate(prompts, params)
        engine = Engine(model, num_slots=8, max_len=64, paged=True, block_size=4, num_blocks=16)
        out = engine.generate(prompts, params)
        assert engine.graphs.captures > 0 and not engine.graphs.failed, engine.graphs.failed
        if preset == "tiny-dense":
            assert engine.fast.uses_triton and engine.fast.attention_kernel and engine.fast.attention_error is None
        assert engine.stats.preemptions > 0 and engine.blocks.in_use == 0
        assert _tokens(out) == _tokens(slotted)
        if params.temperature == 0:
            assert_greedy_is_full_forward_argmax(model, prompts, out, logprob_atol=1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(14, 2, 64, 16), (12, 2, 128, 16), (4, 2, 16, 8)])
def test_paged_decode_attention_kernel_bf16_in_a_cuda_graph(heads, kv_heads, head_dim, block_size):
    """The captured kernel follows block tables and lengths rewritten in place between replays."""
    pytest.importorskip("triton")
    from r1lab.rollout import decode_attention as da

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, kv_len = 256, 640
    per_row = kv_len // block_size
    blocks = B * per_row + 7
    cache = torch.randn(2, blocks, block_size, kv_heads, head_dim, generator=gen, device="cuda").bfloat16()
    q = torch.randn(B, heads, head_dim, generator=gen, device="cuda").bfloat16()
    lengths = torch.full((B,), kv_len, dtype=torch.int32, device="cuda")
    tables = torch.zeros(B, per_row, dtype=torch.int32, device="cuda")
    work = da.Workspace(B, heads, kv_heads, head_dim, kv_len, q.device)
    out = da.decode_attention_triton(q, cache, lengths, head_dim**-0.5, work, tables)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention_triton(q, cache, lengths, head_dim**-0.5, work, tables)
    for trial in range(3):
        tables.copy_(torch.randperm(blocks, generator=gen, device="cuda")[: B * per_row].view(B, per_row))
        lengths.copy_(torch.randint(1, kv_len + 1, (B,), generator=gen, device="cuda"))
        lengths[0], lengths[1] = 1, kv_len
        graph.replay()
        dense = cache[:, tables.long()].flatten(2, 3)  # [2, B, kv_len, Hkv, D]
        ref = da.decode_attention_reference(q, dense, lengths, head_dim**-0.5)
        assert (out.float() - ref.float()).abs().max() < 2e-2, trial
