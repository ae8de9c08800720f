"""The rollout engine on CPU: greedy parity with transformers, log-probs, sampling statistics, continuous
batching, stop/length semantics, chunked prefill, errors, and the streaming interface."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from triton_interpreter import run_interpreted

import r1lab.model as rm
import r1lab.rollout as rollout
from r1lab.rollout import Engine, SamplingParams, generate
from r1lab.rollout.sampling import RowParams, processed_scores, sample

VOCAB = 512


def _model(preset: str, seed: int = 0) -> rm.Transformer:
    """A tiny model with weights large enough that greedy decoding does not just repeat one token."""
    model = rm.build(rm.preset(preset, initializer_range=0.2), seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moe_layers():  # decisive routing: no near-ties between experts
            m.gate.weight.normal_(0, 0.5, generator=gen)
            m.gate.e_score_correction_bias.normal_(0, 0.2, generator=gen)
    return model


def _prompts(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _full_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax of one no-cache forward over prompt+completion, at the completion's tokens: [len(completion)]."""
    ids = torch.tensor([prompt + completion], device=model.lm_head.weight.device)
    with torch.no_grad():
        logp = model(ids)[0].float().log_softmax(-1).cpu()
    start = len(prompt) - 1
    return logp[start : start + len(completion)].gather(1, torch.tensor(completion)[:, None])[:, 0]


def assert_greedy_is_full_forward_argmax(model, prompts, out, logprob_atol: float | None = None) -> None:
    """Each greedy completion equals the argmax of no-cache full forwards (and, with logprob_atol, its
    logprobs equal log_softmax of those forwards)."""
    device = next(model.parameters()).device
    for prompt, c in zip(prompts, out):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(len(c.token_ids)):
                seq.append(int(model(torch.tensor([seq], device=device))[0, -1].argmax()))
        assert c.token_ids == seq[len(prompt):]
        if logprob_atol is not None:
            torch.testing.assert_close(torch.tensor(c.logprobs), _full_logprobs(model, prompt, c.token_ids),
                                       atol=logprob_atol, rtol=0)



# ----------------------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_greedy_matches_transformers_full_forward(tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    model = _model(preset)
    rm.save(model, tmp_path / "ckpt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    prompts = _prompts([5, 11, 1, 8])
    new = 10
    out = generate(model, prompts, SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[]),
                   num_slots=4, max_len=64)
    for prompt, completion in zip(prompts, out):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(new):  # argmax decoding with full forwards, no cache
                seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
        assert completion.token_ids == seq[len(prompt) :]
        assert len(set(completion.token_ids)) > 2  # the test model really varies its output
        assert completion.finish_reason == "length"


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_logprobs_equal_full_forward_log_softmax(preset, dense, moe):
    model = dense if preset == "tiny-dense" else moe
    prompts = _prompts([4, 9, 2])
    stops = list(range(0, VOCAB, 8))  # 1/8 of the vocabulary: some samples stop early
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=100, max_new_tokens=12, stop_token_ids=stops, n=3,
                            seed=7)
    out = generate(model, prompts, params, num_slots=5, max_len=64)
    assert len(out) == 9
    reasons = {c.finish_reason for c in out}
    assert reasons == {"stop", "length"}, reasons
    for c in out:
        prompt = prompts[c.prompt_index]
        expected = _full_logprobs(model, prompt, c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stops and not set(c.token_ids[:-1]) & set(stops)
        else:
            assert len(c.token_ids) == 12 and not set(c.token_ids) & set(stops)


# ----------------------------------------------------------------------------- sampling statistics
def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def test_sampler_follows_temperature_top_k_and_top_p():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    rows = 40_000  # std of a frequency <= 0.0025; the bound below is > 5 std
    keys = torch.arange(rows)  # neighbouring keys: their noise must still be independent
    for params in [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5), SamplingParams(temperature=2.0),
                   SamplingParams(top_p=0.7), SamplingParams(temperature=1.5, top_p=0.8),
                   SamplingParams(top_k=3), SamplingParams(top_k=4, top_p=0.9)]:
        rp = RowParams([params] * rows, 8, torch.device("cpu"))
        tokens, logprobs = sample(logits.expand(rows, 8), rp, keys)
        keys = keys + rows
        expected = processed_scores(logits[None], RowParams([params], 8, torch.device("cpu")))[0].softmax(-1)
        freq = _frequencies(tokens, 8)
        assert (freq - expected).abs().max() < 0.013, (params, freq, expected)
        assert (freq[expected == 0] == 0).all()  # never outside the nucleus / top-k
        torch.testing.assert_close(logprobs, logits.log_softmax(-1)[tokens])  # raw log-probs, temperature 1
    # the nucleus explicitly: p = softmax(logits) ≈ [.39, .24, .14, .09, .05, ...]; top_p 0.7 keeps 3 tokens
    kept = processed_scores(logits[None], RowParams([SamplingParams(top_p=0.7)], 8, torch.device("cpu")))[0]
    assert torch.isfinite(kept).tolist() == [True, True, True, False, False, False, False, False]


def test_sampler_mixes_per_row_params():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6), None,
              SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(top_k=5)]
    rp = RowParams(params, 50, torch.device("cpu"))
    for seed in range(20):
        tokens, _ = sample(logits, rp, torch.randint(0, 2**62, (6,), generator=torch.Generator().manual_seed(seed)))
        greedy = logits.argmax(-1)
        assert tokens[:4].tolist() == greedy[:4].tolist()  # greedy, top-1, tiny nucleus, idle row
        assert tokens[5] in logits[5].topk(5).indices


def test_engine_samples_follow_the_model_distribution(dense):
    """First tokens of many samples of one prompt vs softmax(logits / T) of a full forward."""
    prompt = _prompts([6])[0]
    params = SamplingParams(temperature=1.3, max_new_tokens=1, n=3000, seed=3)
    out = generate(dense, [prompt], params, num_slots=256, max_len=16)
    first = torch.tensor([c.token_ids[0] for c in out])
    with torch.no_grad():
        expected = (dense(torch.tensor([prompt]))[0, -1] / 1.3).softmax(-1)
    # bins of ~equal expected mass (tokens sorted by probability): each bin's frequency has std <= 0.0092
    order = expected.argsort(descending=True)
    bins = (expected[order].cumsum(0) * 10).clamp(max=9.999).long()
    expected_bins = torch.zeros(10).index_add_(0, bins, expected[order])
    observed_bins = torch.zeros(10).index_add_(0, bins, _frequencies(first, VOCAB)[order])
    assert (observed_bins - expected_bins).abs().max() < 0.04, (observed_bins, expected_bins)
    chi2 = ((observed_bins - expected_bins) ** 2 / expected_bins).sum() * len(first)
    assert chi2 < 40, chi2  # 9 degrees of freedom: P(chi2 > 40) < 1e-5


def test_top_p_never_samples_outside_the_nucleus(moe):
    prompts = _prompts([3, 7])
    params = SamplingParams(temperature=0.9, top_p=0.6, max_new_tokens=10, n=4, stop_token_ids=[], seed=5)
    for c in generate(moe, prompts, params, num_slots=8, max_len=32):
        ids = torch.tensor([prompts[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            logits = moe(ids)[0, len(prompts[c.prompt_index]) - 1 : -1]
        rp = RowParams([params] * len(c.token_ids), VOCAB, torch.device("cpu"))
        allowed = torch.isfinite(processed_scores(logits.float(), rp))
        assert allowed.gather(1, torch.tensor(c.token_ids)[:, None]).all()


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize("lookahead", [0, 1])
def test_continuous_batching_matches_one_by_one(dense, lookahead):
    prompts = _prompts([5, 2, 9, 14, 1, 7, 11, 3])
    stops = list(range(0, VOCAB, 16))
    params = SamplingParams(temperature=0, max_new_tokens=15, stop_token_ids=stops)
    engine = Engine(dense, num_slots=3, max_len=40, lookahead=lookahead)
    batched = engine.generate(prompts, params)
    alone = [Engine(dense, num_slots=1, max_len=40).generate([p], params)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in batched] == [c.finish_reason for c in alone]
    assert {c.finish_reason for c in batched} == {"stop", "length"}  # lengths really vary
    assert engine.stats.prefill_forwards > 1 and engine.stats.compaction_moves > 0


def test_fused_decode_path_matches_the_model_forward(dense):
    """The dense fast-decode structure (run with its torch twins on CPU) = the model's generic decode."""
    prompts = _prompts([5, 2, 9, 14, 1, 7])
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, stop_token_ids=list(range(0, VOCAB, 16)), seed=3)
    fast = Engine(dense, num_slots=5, max_len=32, fast_decode=True)
    assert fast.fast is not None and not fast.fast.uses_triton
    out = fast.generate(prompts, params)
    plain = Engine(dense, num_slots=5, max_len=32, fast_decode=False).generate(prompts, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    torch.testing.assert_close(torch.tensor(sum((c.logprobs for c in out), [])),
                               torch.tensor(sum((c.logprobs for c in plain), [])), atol=1e-5, rtol=0)
    assert Engine(_model("tiny-moe"), num_slots=1, max_len=8, fast_decode=True).fast is None  # MLA/MoE: generic


def test_samples_of_a_prompt_share_its_prefill(moe):
    prompts = _prompts([9, 6])
    engine = Engine(moe, num_slots=8, max_len=32)
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=5, n=4))
    assert engine.stats.prefill_tokens == 8 + 5  # prompt[:-1] once per prompt
    assert engine.stats.slot_copies == 6
    for i in range(2):  # greedy: all samples of a prompt agree, and with the prompt alone
        alone = Engine(moe, num_slots=1, max_len=32).generate([prompts[i]], SamplingParams(0, max_new_tokens=5))
        assert all(c.token_ids == alone[0].token_ids for c in out[4 * i : 4 * i + 4])


def test_siblings_admitted_later_copy_from_a_running_sibling(dense):
    """n larger than the slots: later samples copy the prompt's cache from a sibling still running."""
    prompt = _prompts([10])[0]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=7, stop_token_ids=list(range(0, VOCAB, 4)), seed=1)
    engine = Engine(dense, num_slots=3, max_len=32)
    out = engine.generate([prompt], params)
    for c in out:
        torch.testing.assert_close(torch.tensor(c.logprobs), _full_logprobs(dense, prompt, c.token_ids), atol=1e-4,
                                   rtol=0)
    assert engine.stats.slot_copies + engine.stats.prefill_tokens // 9 == 7


def test_prompts_longer_than_a_prefill_chunk(moe):
    prompts = _prompts([23, 11, 4, 17])
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])
    chunked = Engine(moe, num_slots=4, max_len=32, prefill_chunk=4, prefill_tokens=8)
    out = chunked.generate(prompts, params)
    reference = Engine(moe, num_slots=4, max_len=32).generate(prompts, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in reference]
    assert chunked.stats.prefill_forwards >= 22 // 4


# ----------------------------------------------------------------------------- semantics
def test_stop_token_ids_none_vs_empty_vs_explicit(dense):
    prompt = _prompts([6])[0]
    greedy = generate(dense, [prompt], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[]))[0]
    first, third = greedy.token_ids[0], greedy.token_ids[2]
    assert first not in greedy.token_ids[1:3]
    model = _model("tiny-dense")
    model.args.eos_token_id = first  # None → the model's EOS
    c = generate(model, [prompt], SamplingParams(temperature=0, max_new_tokens=8))[0]
    assert (c.token_ids, c.finish_reason) == ([first], "stop")
    c = generate(model, [prompt], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[]))[0]
    assert (c.token_ids, c.finish_reason) == (greedy.token_ids, "length")  # [] → no stop at all
    c = generate(model, [prompt], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[third]))[0]
    assert (c.token_ids, c.finish_reason) == (greedy.token_ids[:3], "stop")  # included as the last token


def test_n_samples_are_prompt_major_and_max_new_tokens_holds(dense):
    prompts = _prompts([3, 8, 5])
    out = generate(dense, prompts, SamplingParams(temperature=1.0, max_new_tokens=7, n=4, stop_token_ids=[], seed=2))
    assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(3) for s in range(4)]
    assert all(len(c.token_ids) == 7 and len(c.logprobs) == 7 and c.finish_reason == "length" for c in out)
    assert len({tuple(c.token_ids) for c in out[:4]}) > 1  # samples differ
    empty = generate(dense, prompts, SamplingParams(max_new_tokens=0, n=2))
    assert [(c.token_ids, c.finish_reason) for c in empty] == [([], "length")] * 6


def test_same_seed_same_tokens(dense):
    prompts = _prompts([4, 6])
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=11, stop_token_ids=[])
    a = [c.token_ids for c in generate(dense, prompts, params)]
    b = [c.token_ids for c in generate(dense, prompts, params)]
    c = [c.token_ids for c in generate(dense, prompts, SamplingParams(**{**params.__dict__, "seed": 12}))]
    assert a == b and a != c


def test_seeded_draws_do_not_depend_on_the_batch(dense):
    """A seeded request samples the same tokens alone, beside other requests (seeded or not, admitted before
    or after it, so in another slot), in a smaller cache that queues it, and inside generate() at an offset
    (prompt i of generate is the request with seed + i)."""
    prompt, others = _prompts([5])[0], _prompts([3, 7, 4, 6], seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=3, seed=41, stop_token_ids=[])

    def run(engine, before, after, before_tokens=12):
        for p in before:
            engine.add_request(p, SamplingParams(temperature=1.0, max_new_tokens=before_tokens, n=2,
                                                 stop_token_ids=[]))
        rid = engine.add_request(prompt, params, keep=True)
        for i, p in enumerate(after):
            engine.add_request(p, SamplingParams(temperature=0.7, max_new_tokens=4, n=1, seed=i))
        while engine.has_unfinished():
            engine.step()
        return [c.token_ids for c in engine.completions(rid)]

    alone = run(Engine(dense, num_slots=8, max_len=32), [], [])
    assert len(set(map(tuple, alone))) == 3  # the three samples differ from each other
    assert run(Engine(dense, num_slots=8, max_len=32), others[:2], others[2:]) == alone
    assert run(Engine(dense, num_slots=4, max_len=32), others, []) == alone  # queued, then admitted late
    engine = Engine(dense, num_slots=16, max_len=32)  # the others finish first: its rows move to lower slots
    assert run(engine, others, [], before_tokens=1) == alone and engine.stats.compaction_moves > 0
    unseeded = dataclasses.replace(params, seed=None)
    shifted = generate(dense, others[:2] + [prompt], dataclasses.replace(params, seed=39))
    assert [c.token_ids for c in shifted if c.prompt_index == 2] == alone
    engine = Engine(dense, num_slots=8, max_len=32)
    engine.seed(5)
    first = engine.generate([prompt], unseeded)
    engine.seed(5)
    assert [c.token_ids for c in engine.generate([prompt], unseeded)] == [c.token_ids for c in first] != alone


def test_uniform_noise_is_uniform_and_independent_across_keys():
    from r1lab.rollout.sampling import uniform_noise

    keys = torch.tensor([0, 1, 2, 3, 1 << 32, (1 << 32) + 1, 2**62 - 1, 12345])  # neighbours, high bits
    u = uniform_noise(keys, 50_000)
    assert u.min() >= 0 and u.max() < 1
    assert (u.mean(1) - 0.5).abs().max() < 0.006  # std of a mean of 50k uniforms: 0.0013
    counts = torch.histc(u.flatten(), bins=20, min=0, max=1)
    expected = u.numel() / 20
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 19 dof: p < 1e-5 above 50
    centered = u - 0.5
    corr = (centered @ centered.T) / (centered.norm(dim=1)[:, None] * centered.norm(dim=1)[None, :])
    assert (corr - torch.eye(len(keys))).abs().max() < 0.025  # rows of different keys are uncorrelated
    assert torch.equal(uniform_noise(keys[[5, 2]], 50_000), u[[5, 2]])  # a key's row, whatever the batch


def test_bad_requests_raise_clear_errors(dense):
    engine = Engine(dense, num_slots=2, max_len=16)
    with pytest.raises(ValueError, match="prompt 1 has 12 tokens.*max_new_tokens 5.*16"):
        engine.generate([[1, 2], list(range(12))], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.add_request([VOCAB], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished()  # a rejected call queued nothing


def test_generate_reuses_its_engine_and_restores_training_mode(moe):
    rollout.release_engines()
    moe.train()
    generate(moe, _prompts([3]), SamplingParams(max_new_tokens=2))
    engine = rollout._engines[id(moe)]
    generate(moe, _prompts([5]), SamplingParams(max_new_tokens=3))
    assert rollout._engines[id(moe)] is engine
    assert moe.training and all(m.expert_load.sum() == 0 for m in moe.moe_layers())
    moe.eval()
    rollout.release_engines()


# ----------------------------------------------------------------------------- streaming
def _drain(engine: Engine, on_step=None) -> tuple[dict, dict]:
    """Run an engine's step() loop; returns tokens and finish reasons per (request id, sample index)."""
    streamed: dict[tuple[int, int], list[int]] = {}
    finished: dict[tuple[int, int], str] = {}
    steps = 0
    while engine.has_unfinished():
        for ev in engine.step():
            key = (ev.request_id, ev.sample_index)
            assert key not in finished  # nothing after the finishing event
            streamed.setdefault(key, []).extend(ev.new_token_ids)
            if ev.finished:
                finished[key] = ev.finish_reason
        steps += 1
        if on_step:
            on_step(steps)
    return streamed, finished


@pytest.mark.parametrize("lookahead", [0, 1])
def test_streaming_yields_the_same_tokens_as_generate(dense, lookahead):
    prompts = _prompts([5, 8, 3])
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=9, n=2, seed=4,
                            stop_token_ids=list(range(0, VOCAB, 8)))
    reference = Engine(dense, num_slots=4, max_len=32, lookahead=lookahead).generate(prompts, params)
    engine = Engine(dense, num_slots=4, max_len=32, lookahead=lookahead)
    ids = [engine.add_request(p, params, keep=True, seed=params.seed + i) for i, p in enumerate(prompts)]
    streamed, finished = _drain(engine)
    for request_id, prompt_index in zip(ids, range(3)):
        for c in engine.completions(request_id):
            ref = reference[2 * prompt_index + c.sample_index]
            assert streamed[(request_id, c.sample_index)] == c.token_ids == ref.token_ids
            assert finished[(request_id, c.sample_index)] == c.finish_reason == ref.finish_reason
    assert {c.finish_reason for c in reference} == {"stop", "length"}


def test_request_added_between_steps_joins_the_batch(dense):
    prompts = _prompts([5, 8, 3])
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])
    engine = Engine(dense, num_slots=4, max_len=32)
    ids = [engine.add_request(prompts[0], params), engine.add_request(prompts[1], params)]
    streamed, _ = _drain(engine, lambda step: step == 2 and ids.append(engine.add_request(prompts[2], params)))
    for request_id, prompt in zip(ids, prompts):
        assert streamed[(request_id, 0)] == generate(dense, [prompt], params)[0].token_ids
    assert not engine.requests  # streamed requests are forgotten once finished


# ----------------------------------------------------------------------------- CUDA paths (run with -m gpu)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("lookahead", [0, 1])
def test_cuda_graph_decode_matches_full_forward(lookahead):
    """fp32 dense model on the GPU: graph-captured, bucketed, overlapped decode = argmax of full forwards."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model("tiny-dense").cuda()
    prompts = _prompts([5, 2, 9, 14, 1, 7, 11, 3, 30, 6])
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=list(range(0, VOCAB, 16)))
    engine = Engine(model, num_slots=4, max_len=64, lookahead=lookahead)
    out = engine.generate(prompts, params)
    assert engine.graphs is not None and engine.graphs.captures > 0 and not engine.graphs.failed
    assert_greedy_is_full_forward_argmax(model, prompts, out, logprob_atol=1e-4)


@pytest.mark.gpu
@cuda
def test_cuda_moe_mla_fp32_decode_is_graph_captured():
    """fp32 MoE + MLA on the GPU (no grouped GEMM): the dense expert dispatch keeps decode capturable, and the
    captured greedy decode equals the argmax of full forwards (which route through the loop path)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model("tiny-moe").cuda()
    prompts = _prompts([5, 12, 3, 8, 20])
    engine = Engine(model, num_slots=4, max_len=64)
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[]))
    assert engine.graphs.captures > 0 and not engine.graphs.failed, engine.graphs.failed
    assert_greedy_is_full_forward_argmax(model, prompts, out)


@pytest.mark.gpu
@cuda
def test_cuda_moe_mla_bf16_graphs_capture_and_track_the_reference():
    model = _model("tiny-moe").to("cuda", torch.bfloat16)
    prompts = _prompts([5, 12, 3, 8])
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=3, stop_token_ids=[], seed=0)
    engine = Engine(model, num_slots=8, max_len=64)
    out = engine.generate(prompts, params)
    assert engine.graphs.captures > 0 and not engine.graphs.failed
    reference = _model("tiny-moe")  # fp32 CPU, same weights
    errors = torch.cat([torch.tensor(c.logprobs) - _full_logprobs(reference, prompts[c.prompt_index], c.token_ids)
                        for c in out])
    assert errors.abs().mean() < 0.05, errors.abs().mean()  # bf16 model vs fp32 reference


@pytest.mark.gpu
@cuda
def test_triton_fused_decode_matches_torch_twins_bf16():
    from r1lab.rollout.fast_decode import FastDecoder

    args = rm.preset("qwen2.5-0.5b", num_hidden_layers=3, vocab_size=4096)
    model = rm.build(args, seed=0, dtype=torch.bfloat16, device="cuda").eval()
    B, kv = 48, 200
    outs = []
    for use_triton in (True, False):
        cache = model.make_cache(B, 256)
        positions = torch.arange(B, device="cuda") * 3 + 50
        with torch.inference_mode():
            for p in range(0, 199):  # fill the cache with the generic path first
                model(torch.full((B, 1), p % 4096, device="cuda"), torch.full((B, 1), p, device="cuda"),
                      cache=cache, kv_len=p + 1)
            out = torch.empty(B, 4096, dtype=torch.bfloat16, device="cuda")
            decoder = FastDecoder(model, cache, use_triton=use_triton)
            assert decoder.uses_triton == use_triton
            decoder(torch.arange(B, device="cuda") * 7, positions, kv, out)
            ref = model(torch.arange(B, device="cuda")[:, None] * 7, positions[:, None], cache=cache, kv_len=kv)[:, 0]
        outs.append(out.float())
        assert (out.float() - ref.float()).abs().max() < 0.05
        assert (out.float().argmax(-1) == ref.float().argmax(-1)).float().mean() > 0.9
    assert (outs[0] - outs[1]).abs().max() < 0.05


@pytest.mark.gpu
@cuda
def test_fused_gpu_sampler_follows_temperature():
    from r1lab.rollout.fused_sampling import gumbel_max_sample as sample_fn

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], device="cuda")
    rows = 40_000
    for temperature in (1.0, 0.5, 2.0):
        temps = torch.full((rows,), temperature, device="cuda")
        keys = torch.arange(rows, device="cuda") + int(temperature * 7) * rows
        tokens, logprobs = sample_fn(logits.expand(rows, 8).bfloat16(), temps, keys)
        freq = _frequencies(tokens.cpu(), 8)
        expected = (logits.bfloat16().float().cpu() / temperature).softmax(-1)
        assert (freq - expected).abs().max() < 0.013, (temperature, freq, expected)
        torch.testing.assert_close(logprobs, logits.bfloat16().float().log_softmax(-1)[tokens])
    big = torch.randn(33, 151936, device="cuda", dtype=torch.bfloat16) * 3
    temps = torch.tensor([0.0] * 11 + [1.0] * 22, device="cuda")
    tokens, logprobs = sample_fn(big, temps, torch.arange(33, device="cuda") + 123)
    assert tokens[:11].tolist() == big[:11].float().argmax(-1).tolist()
    torch.testing.assert_close(logprobs, big.float().log_softmax(-1).gather(1, tokens[:, None])[:, 0])


_SAMPLER_INTERPRETED = """
import torch
from r1lab.rollout.fused_sampling import gumbel_max_sample, philox_uniform

keys = torch.tensor([7, 8, 1 << 40, 2**62 - 1])
u = philox_uniform(keys, 5000)
assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01, u.mean()
assert torch.equal(philox_uniform(keys[[2, 0]], 5000), u[[2, 0]])  # a key's row, whatever the batch
assert (u[0] - u[1]).abs().mean() > 0.3  # neighbouring keys: different streams

# the fused draw = Gumbel-max over the same uniforms the top-k / top-p path uses (sampling.sample)
g = torch.Generator().manual_seed(0)
logits = torch.randn(6, 5000, generator=g) * 2
temps = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 0.0])
keys = torch.randint(0, 2**62, (6,), generator=g)
tokens, logprobs = gumbel_max_sample(logits, temps, keys)
noise = philox_uniform(keys, 5000).log().neg().log()
scores = torch.where(temps[:, None] == 0, logits, logits / temps.clamp(min=1e-9)[:, None] - noise)
assert tokens.tolist() == scores.argmax(-1).tolist(), (tokens, scores.argmax(-1))
torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])

# frequencies follow softmax(logits / T)
small = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
rows = 1000  # std of a frequency <= 0.016
tokens, _ = gumbel_max_sample(small.expand(rows, 8).contiguous(), torch.full((rows,), 0.8), torch.arange(rows))
freq = torch.bincount(tokens, minlength=8).float() / rows
assert (freq - (small / 0.8).softmax(-1)).abs().max() < 0.07, freq
print("sampler ok")
"""


def test_fused_sampler_kernels_under_the_interpreter():
    assert "sampler ok" in run_interpreted(_SAMPLER_INTERPRETED)


def test_a_stop_string_ends_the_sample_at_the_token_that_completes_it(tmp_path):
    """Greedy decoding twice: the second run stops where a piece of the first run's text first appears."""
    from r1lab.model import load_model_and_tokenizer
    from r1lab.tasks import Task
    from r1lab.testing import build_random_checkpoint

    model, tok = load_model_and_tokenizer(build_random_checkpoint(tmp_path / "m", seed=3))
    prompt = [tok.encode("What is 2 + 3?")]
    free = generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[]))[0]
    text_at = [tok.decode(free.token_ids[:k]) for k in range(len(free.token_ids) + 1)]
    k = next(k for k in range(8, len(text_at)) if len(text_at[k]) > len(text_at[k - 1]))
    stop = text_at[k][-2:]  # the last two characters once the k-th token is there
    first = next(j for j in range(1, k + 1) if stop in text_at[j])
    params = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[], stop_strings=(stop,),
                            detokenize=tok.decode)
    cut = generate(model, prompt, params)[0]
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[:first]
    assert Task.completion_text(tok, cut.token_ids, stop_strings=[stop]).endswith(stop)
    assert Task.completion_text(tok, free.token_ids, stop_strings=[stop]) == text_at[first][:text_at[first].find(stop) + 2]
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop_strings=("x",))
