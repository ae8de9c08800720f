"""The fast decode path's options: fused q|k|v and gate|up GEMMs (with weights refreshed from the model) and the
valid-length decode attention (torch twin on CPU, the Triton kernel under Triton's interpreter on CPU and on
the GPU)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_rollout import (
    VOCAB,
    _full_logprobs,
    _model,
    _prompts,
    assert_greedy_is_full_forward_argmax,
)
from triton_interpreter import run_interpreted

from r1lab.rollout import Engine, SamplingParams
from r1lab.rollout import decode_attention as da
from r1lab.rollout.fast_decode import FastDecoder

VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (fused_proj, decode_attention)


def _greedy_reference(model, prompt: list[int], new: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):  # argmax of full forwards, no cache
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def dense():
    return _model("tiny-dense")


# ----------------------------------------------------------------------------- engine parity (CPU, fp32)
@pytest.mark.parametrize("fused_proj,decode_attention", VARIANTS)
def test_fast_decode_options_match_full_forward_and_generic_path(dense, fused_proj, decode_attention):
    """Greedy tokens = argmax of full forwards and = the generic decode; log-probs = full-forward log_softmax.
    3 slots for 8 prompts of different lengths: rows of one step have different valid lengths, slots are
    reused (stale cache rows past a new sequence's length) and sequences are compacted into lower slots."""
    prompts = _prompts([5, 2, 9, 14, 1, 7, 11, 3])
    params = SamplingParams(temperature=0, max_new_tokens=15, stop_token_ids=list(range(0, VOCAB, 16)))
    engine = Engine(dense, num_slots=3, max_len=40, fast_decode=True, fused_proj=fused_proj,
                    decode_attention=decode_attention)
    assert (engine.fast.fused is not None) == fused_proj and engine.fast.decode_attention == decode_attention
    engine.fast.attention_chunks = 3  # the split-K merge of the twin, with chunks past short rows' lengths
    out = engine.generate(prompts, params)
    generic = Engine(dense, num_slots=3, max_len=40, fast_decode=False).generate(prompts, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in generic]
    assert {c.finish_reason for c in out} == {"stop", "length"}
    for prompt, c in zip(prompts, out):
        assert c.token_ids == _greedy_reference(dense, prompt, len(c.token_ids))
        torch.testing.assert_close(torch.tensor(c.logprobs), _full_logprobs(dense, prompt, c.token_ids),
                                   atol=1e-4, rtol=0)
    assert engine.stats.compaction_moves > 0


def test_sampled_outputs_identical_across_options(dense):
    """Same seed, temperature 1 with top-p: every option gives the same tokens as the unfused path."""
    prompts = _prompts([4, 9, 2, 6])
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, n=2, stop_token_ids=[], seed=5)
    outs = []
    for fused_proj, decode_attention in VARIANTS:
        engine = Engine(dense, num_slots=5, max_len=32, fast_decode=True, fused_proj=fused_proj,
                        decode_attention=decode_attention)
        outs.append(engine.generate(prompts, params))
    for out in outs[1:]:
        assert [c.token_ids for c in out] == [c.token_ids for c in outs[0]]
        torch.testing.assert_close(torch.tensor(sum((c.logprobs for c in out), [])),
                                   torch.tensor(sum((c.logprobs for c in outs[0]), [])), atol=1e-5, rtol=0)


def test_defaults_on_cpu():
    model = _model("tiny-dense")
    engine = Engine(model, num_slots=2, max_len=16, fast_decode=True)
    assert engine.fast.fused is not None  # fused projections: on by default
    assert not engine.fast.decode_attention  # the kernel needs CUDA; the CPU default keeps SDPA
    assert Engine(model, num_slots=2, max_len=16).fast is None  # CPU default: generic decode


def test_attention_kernel_failure_falls_back_to_sdpa(dense, monkeypatch):
    """A kernel that cannot compile (first call) leaves a warning and SDPA, not a crashed rollout."""
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(da, "decode_attention_triton", broken)
    prompts = _prompts([4, 9])
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])
    engine = Engine(dense, num_slots=2, max_len=32, fast_decode=True, decode_attention=True)
    engine.fast.attention_kernel = True  # as on CUDA with Triton
    with pytest.warns(UserWarning, match="no compiler here"):
        out = engine.generate(prompts, params)
    assert not engine.fast.attention_kernel and "no compiler here" in engine.fast.attention_error
    assert [c.token_ids for c in out] == [_greedy_reference(dense, p, 6) for p in prompts]


# ----------------------------------------------------------------------------- fused weights follow the model
def _fused_matches_model(fast: FastDecoder) -> bool:
    for i, block in enumerate(fast.model.model.layers):
        a, m = block.self_attn, block.mlp
        if not torch.equal(fast.fused.qkv_weight[i], torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])):
            return False
        if not torch.equal(fast.fused.qkv_bias[i], torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])):
            return False
        if not torch.equal(fast.fused.gate_up[i], torch.cat([m.gate_proj.weight, m.up_proj.weight])):
            return False
    return True


def test_fused_weights_pick_up_in_place_updates_between_generate_calls():
    model = _model("tiny-dense", seed=3)
    prompts = _prompts([6, 3, 10])
    params = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[])
    engine = Engine(model, num_slots=3, max_len=32, fast_decode=True, fused_proj=True)
    before = [c.token_ids for c in engine.generate(prompts, params)]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what an optimizer step does: in-place writes to the parameters
        for block in model.model.layers:
            block.self_attn.k_proj.weight.add_(torch.randn(block.self_attn.k_proj.weight.shape, generator=gen) * 0.3)
            block.self_attn.q_proj.bias.mul_(-1.0)
            block.mlp.up_proj.weight.add_(torch.randn(block.mlp.up_proj.weight.shape, generator=gen) * 0.3)
    after = [c.token_ids for c in engine.generate(prompts, params)]
    assert after != before
    assert _fused_matches_model(engine.fast)
    fresh = Engine(model, num_slots=3, max_len=32, fast_decode=True, fused_proj=True).generate(prompts, params)
    assert after == [c.token_ids for c in fresh]
    assert after == [_greedy_reference(model, p, 10) for p in prompts]
    # writes through .data skip the version counter: the refresh when a batch starts still catches them
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.data.copy_(
            torch.randn(model.model.layers[1].mlp.gate_proj.weight.shape, generator=gen) * 0.5)
    again = [c.token_ids for c in engine.generate(prompts, params)]
    assert again != after and again == [_greedy_reference(model, p, 10) for p in prompts]


def test_fused_weights_refresh_when_updated_while_requests_run():
    """A version-counter change between two steps of running requests is seen by the next step."""
    model = _model("tiny-dense", seed=4)
    engine = Engine(model, num_slots=2, max_len=32, fast_decode=True, fused_proj=True, lookahead=0)
    engine.add_request(_prompts([5])[0], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[]))
    engine.step()
    engine.step()
    refreshes = engine.fast.fused.refreshes
    engine.step()
    assert engine.fast.fused.refreshes == refreshes  # nothing changed: no copy
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(0.5)
    assert not _fused_matches_model(engine.fast)
    engine.step()
    assert engine.fast.fused.refreshes == refreshes + 1 and _fused_matches_model(engine.fast)


# ----------------------------------------------------------------------------- decode attention math
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (14, 2, 64), (6, 6, 24)])
def test_decode_attention_twin_matches_masked_softmax(heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads)
    B, slots, cache_len, kv_len = 6, 8, 300, 256
    cache = torch.randn(2, slots, cache_len, kv_heads, head_dim, generator=gen)
    q = torch.randn(B, heads, head_dim, generator=gen)
    lengths = torch.tensor([1, kv_len, 7, 129, 128, 200])
    ref = da.decode_attention_reference(q, cache, lengths, head_dim**-0.5)
    for chunks in (1, 2, 5):
        out = da.decode_attention_torch(q, cache, lengths, kv_len, head_dim**-0.5, chunks)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    # positions past a row's length never matter (stale cache contents)
    poisoned = cache.clone()
    for b, n in enumerate(lengths.tolist()):
        poisoned[:, b, n:] = 1e4
    torch.testing.assert_close(da.decode_attention_torch(q, poisoned, lengths, kv_len, head_dim**-0.5, 3), ref,
                               atol=2e-6, rtol=0)
    # and the reference itself is the plain per-row softmax
    b, h = 3, heads - 1
    k = cache[0, b, : lengths[b], h // (heads // kv_heads)]
    v = cache[1, b, : lengths[b], h // (heads // kv_heads)]
    torch.testing.assert_close(ref[b, h], ((k @ q[b, h]) * head_dim**-0.5).softmax(0) @ v, atol=1e-5, rtol=0)


def test_num_chunks_covers_the_bucket():
    for batch in (1, 3, 16, 256, 512):
        for kv_len in (1, 64, 128, 200, 640, 4096, 7000):
            chunk, n = da.num_chunks(batch, 2, kv_len, 132)
            assert chunk % da.BLOCK_N == 0 and n >= 1
            assert (n - 1) * chunk < kv_len <= n * chunk
    assert da.num_chunks(256, 2, 640, 132)[1] > 1 and da.num_chunks(1, 2, 4096, 132)[1] == 32


# ----------------------------------------------------------------------------- Triton kernels, interpreter on CPU
_INTERPRETED = textwrap.dedent('''
    import torch
    from r1lab.rollout import decode_attention as da

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for B, H, Hkv, D, slots, cache_len, kv_len in [(5, 4, 2, 16, 7, 300, 256), (3, 14, 2, 64, 4, 200, 200),
                                                   (4, 6, 6, 24, 4, 130, 130), (2, 12, 2, 128, 2, 70, 64)]:
        cache = torch.randn(2, slots, cache_len, Hkv, D, generator=gen)
        q = torch.randn(B, H, D, generator=gen)
        lengths = torch.randint(1, kv_len + 1, (B,), generator=gen)
        lengths[0], lengths[-1] = kv_len, 1
        work = da.Workspace(B, H, Hkv, D, kv_len, q.device)
        assert work.n_chunks * work.chunk >= kv_len
        out = da.decode_attention_triton(q, cache, lengths.to(torch.int32), D ** -0.5, work)
        ref = da.decode_attention_reference(q, cache, lengths, D ** -0.5)
        worst = max(worst, (out - ref).abs().max().item())
    assert worst < 1e-5, worst
    print("kernel ok", worst)

    # the whole Triton decode path (fused GEMMs, strided RoPE/cache write, fused SiLU, attention kernel),
    # fp32 on CPU, inside the engine: greedy tokens equal the generic decode
    import r1lab.model as rm
    from r1lab.rollout import Engine, SamplingParams
    from r1lab.rollout.fast_decode import FastDecoder

    model = rm.build(rm.preset("tiny-dense", initializer_range=0.2), seed=0).eval()
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 2, 9, 14, 1)]
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=list(range(0, 512, 16)))
    for fused_proj in (True, False):
        engine = Engine(model, num_slots=3, max_len=32, fast_decode=True)
        engine.fast = FastDecoder(model, engine.cache, use_triton=True, fused_proj=fused_proj, decode_attention=True)
        assert engine.fast.uses_triton and engine.fast.attention_kernel
        out = engine.generate(prompts, params)
        plain = Engine(model, num_slots=3, max_len=32, fast_decode=False).generate(prompts, params)
        assert [c.token_ids for c in out] == [c.token_ids for c in plain], fused_proj
        lp = torch.tensor(sum((c.logprobs for c in out), []))
        assert (lp - torch.tensor(sum((c.logprobs for c in plain), []))).abs().max() < 1e-4
    print("engine ok")
''')


def test_triton_kernels_under_the_interpreter():
    out = run_interpreted(_INTERPRETED)
    assert "kernel ok" in out and "engine ok" in out


# ----------------------------------------------------------------------------- GPU (run with -m gpu)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(14, 2, 64), (12, 2, 128), (4, 2, 16)])
def test_decode_attention_kernel_bf16_in_a_cuda_graph(heads, kv_heads, head_dim):
    pytest.importorskip("triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, slots, cache_len, kv_len = 256, 260, 700, 640
    cache = torch.randn(2, slots, cache_len, kv_heads, head_dim, generator=gen, device="cuda").bfloat16()
    q = torch.randn(B, heads, head_dim, generator=gen, device="cuda").bfloat16()
    lengths = torch.zeros(B, dtype=torch.int32, device="cuda")
    work = da.Workspace(B, heads, kv_heads, head_dim, kv_len, q.device)
    out = da.decode_attention_triton(q, cache, lengths.fill_(kv_len), head_dim**-0.5, work)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention_triton(q, cache, lengths, head_dim**-0.5, work)
    for trial in range(3):  # new lengths each replay: nothing about them was baked into the graph
        lengths.copy_(torch.randint(1, kv_len + 1, (B,), generator=gen, device="cuda"))
        lengths[0], lengths[1] = 1, kv_len
        graph.replay()
        ref = da.decode_attention_reference(q, cache, lengths, head_dim**-0.5)
        assert (out.float() - ref.float()).abs().max() < 2e-2, trial
        twin = da.decode_attention_torch(q, cache, lengths.long(), kv_len, head_dim**-0.5, work.n_chunks)
        assert (out.float() - twin.float()).abs().max() < 2e-2, trial


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fused_proj,decode_attention", VARIANTS)
def test_cuda_graph_decode_options_match_full_forward(fused_proj, decode_attention):
    """fp32 tiny model on the GPU with graphs: every option combination = argmax of full forwards."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model("tiny-dense").cuda()
    prompts = _prompts([5, 2, 9, 14, 1, 7, 11, 3, 30, 6])
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=list(range(0, VOCAB, 16)))
    engine = Engine(model, num_slots=4, max_len=64, fused_proj=fused_proj, decode_attention=decode_attention)
    assert engine.fast is not None and engine.fast.attention_kernel == decode_attention
    out = engine.generate(prompts, params)
    assert engine.graphs.captures > 0 and not engine.graphs.failed
    assert engine.fast.attention_error is None and engine.fast.attention_kernel == decode_attention
    assert_greedy_is_full_forward_argmax(model, prompts, out, logprob_atol=1e-4)
    # an in-place update between generate calls reaches the captured graphs
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(-1)
    again = engine.generate(prompts[:3], params)
    fresh = Engine(model, num_slots=4, max_len=64, fused_proj=fused_proj,
                   decode_attention=decode_attention).generate(prompts[:3], params)
    assert [c.token_ids for c in again] == [c.token_ids for c in fresh]


@pytest.mark.gpu
@cuda
def test_qwen_shape_bf16_options_track_the_unfused_step():
    """One bf16 decode step of a 3-layer Qwen2.5-0.5B-shaped model: each option stays within bf16 noise."""
    import r1lab.model as rm

    args = rm.preset("qwen2.5-0.5b", num_hidden_layers=3, vocab_size=4096)
    model = rm.build(args, seed=0, dtype=torch.bfloat16, device="cuda").eval()
    B, kv = 48, 256
    logits = {}
    for fused_proj, decode_attention in VARIANTS:
        cache = model.make_cache(B, 256)
        positions = torch.arange(B, device="cuda") * 3 + 50
        with torch.inference_mode():
            for p in range(199):
                model(torch.full((B, 1), p % 4096, device="cuda"), torch.full((B, 1), p, device="cuda"),
                      cache=cache, kv_len=p + 1)
            decoder = FastDecoder(model, cache, use_triton=True, fused_proj=fused_proj,
                                  decode_attention=decode_attention)
            out = torch.empty(B, 4096, dtype=torch.bfloat16, device="cuda")
            decoder(torch.arange(B, device="cuda") * 7, positions, kv, out)
        logits[(fused_proj, decode_attention)] = out.float()
    base = logits[(False, False)]
    for key, value in logits.items():
        assert (value - base).abs().max() < 0.05, key
        assert (value.argmax(-1) == base.argmax(-1)).float().mean() > 0.9, key
