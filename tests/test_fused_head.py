"""The fused vocabulary head (r1lab/train/fused_head.py) equals the plain log_softmax / cross_entropy head:
values, entropies and gradients w.r.t. the hidden states, the head weight and the norm weight; the torch
twin on CPU, the Triton kernels under Triton's interpreter (CPU, fp32) and on the GPU (fp32 and bf16)."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_interpreted

import r1lab.model as rm
import r1lab.train.fused_head as fh
import r1lab.train.logprobs as lpm
from r1lab.model.layers import RMSNorm
from r1lab.train.fused_head import fused_cross_entropy, fused_head_logprobs
from r1lab.train.logprobs import logprobs_from_hidden

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _problem(N=37, d=16, V=300, seed=0):
    """Random fp32 hidden rows, head weight, norm, and targets with ignored rows (-1 and -100)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).requires_grad_()
    W = (torch.randn(V, d, generator=g) * 0.5).requires_grad_()
    norm = RMSNorm(d)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
    t = torch.randint(0, V, (N,), generator=g)
    t[3], t[10], t[N - 1] = -1, -100, -1
    w_logp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return h, W, norm, t, w_logp, w_ent


def _reference(h, W, norm, t, temperature):
    z = (norm(h) @ W.t()) / temperature
    logp = torch.log_softmax(z, -1).gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
    logp = torch.where(t >= 0, logp, 0.0)
    return logp, torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def _values_and_grads(fn, h, W, norm, w_logp, w_ent, entropy_grad):
    for p in (h, W, norm.weight):
        p.grad = None
    logp, ent = fn()
    loss = (logp * w_logp).sum() + ((ent * w_ent).sum() if entropy_grad else 0.0)
    loss.backward()
    return [logp.detach(), ent.detach(), h.grad.clone(), W.grad.clone(), norm.weight.grad.clone()]


def _exact(h, W, norm, t, w_logp, w_ent, temperature, entropy_grad):
    """The plain log_softmax head on float64 copies of the fp32 inputs (the exact answer), cast back to fp32."""
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    norm64 = copy.deepcopy(norm).double()
    out = _values_and_grads(lambda: _reference(h64, W64, norm64, t, temperature), h64, W64, norm64,
                            w_logp.double(), w_ent.double(), entropy_grad)
    return [v.float() for v in out]


def _assert_all_close(got, ref, label, tolerances: dict | None = None):
    for name, a, b in zip(["logp", "entropy", "grad hidden", "grad head", "grad norm"], got, ref):
        tol = (tolerances or {}).get(name, TOL)
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{label} {name}: {m}")


# ----------------------------------------------------------------------------------------- torch twin (CPU)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("store_chunks", [0, 2, None])  # none kept, the first 2 chunks kept, all kept
def test_matches_log_softmax_reference(temperature, entropy_grad, store_chunks):
    h, W, norm, t, w_logp, w_ent = _problem()
    chunk = 8  # 37 rows: 4 full chunks and one of 5
    store = float("inf") if store_chunks is None else store_chunks * chunk * W.shape[0] * 4
    ref = _exact(h, W, norm, t, w_logp, w_ent, temperature, entropy_grad)
    got = _values_and_grads(
        lambda: fused_head_logprobs(h, W, t, norm=norm, temperature=temperature, with_entropy=True, chunk_size=chunk,
                                    store_bytes=store, impl="torch"),
        h, W, norm, w_logp, w_ent, entropy_grad)
    _assert_all_close(got, ref, f"T={temperature} store={store_chunks}")
    assert (got[0][t < 0] == 0).all() and (got[0][t >= 0] < 0).all()
    assert (got[2][t < 0].abs().sum() > 0) == entropy_grad  # ignored rows: only the entropy has a gradient


def test_logp_only_matches_and_ignored_rows_get_no_gradient():
    h, W, norm, t, w_logp, _ = _problem(seed=1)
    logp = fused_head_logprobs(h, W, t, norm=norm, temperature=1.3, chunk_size=10, impl="torch")
    ref = _exact(h, W, norm, t, w_logp, w_logp, 1.3, False)[0]
    torch.testing.assert_close(logp, ref, **TOL)
    (logp * w_logp).sum().backward()
    assert (h.grad[t < 0] == 0).all() and (h.grad[t >= 0] != 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_F_cross_entropy(reduction):
    h, W, _, t, _, _ = _problem(seed=2)
    t = torch.where(t < 0, -100, t)
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    grads = []
    for fn, x, w in ((lambda: F.cross_entropy(h64 @ W64.t(), t, reduction=reduction), h64, W64),
                     (lambda: fused_cross_entropy(h, W, t, reduction=reduction, chunk_size=6, impl="torch"), h, W)):
        loss = fn()
        (loss if reduction != "none" else loss.sum()).backward()
        grads.append((loss.detach().float(), x.grad.float(), w.grad.float()))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL)


def _spy_rows(monkeypatch):
    """Record write_grad of every per-chunk call of the torch twin (True = G written into the chunk)."""
    calls = []
    real = fh._rows_torch

    def spy(logits, targets, inv_temp, write_grad, logp, ent):
        calls.append(write_grad)
        return real(logits, targets, inv_temp, write_grad, logp, ent)

    monkeypatch.setattr(fh, "_rows_torch", spy)
    return calls


def test_store_budget_keeps_the_first_chunks_and_recomputes_the_others(monkeypatch):
    calls = _spy_rows(monkeypatch)
    h, W, norm, t, w_logp, _ = _problem()
    chunk_bytes = 8 * W.shape[0] * 4
    logp = fused_head_logprobs(h, W, t, norm=norm, chunk_size=8, store_bytes=2.5 * chunk_bytes, impl="torch")
    assert calls == [True, True, False, False, False]  # forward: 2 chunks fit the budget
    (logp * w_logp).sum().backward()
    assert calls[5:] == [True, True, True]  # backward: the 3 others recomputed, the kept ones reused
    calls.clear()
    with torch.no_grad():  # no gradient wanted: nothing written or kept
        fused_head_logprobs(h, W, t, norm=norm, chunk_size=8, store_bytes=float("inf"), impl="torch")
    assert calls == [False] * 5


def test_argument_checks():
    h, W, _, t, _, _ = _problem()
    with pytest.raises(ValueError):
        fused_head_logprobs(h, W, t[:-1])
    with pytest.raises(ValueError):
        fused_head_logprobs(h, W, t, chunk_size=0)
    with pytest.raises(ValueError):
        fused_head_logprobs(h, W, t, temperature=0.0)
    with pytest.raises(ValueError):
        fused_head_logprobs(h, W, t, impl="cuda")
    assert not fh._use_triton("auto", torch.device("cpu"))


# ----------------------------------------------------------------------------------------- logprobs wiring
@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe"])  # tied and untied head
def model(request):
    return rm.build(rm.preset(request.param, initializer_range=0.1), seed=0)


def test_logprobs_from_hidden_fused_equals_plain(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.args.vocab_size, (2, 19), generator=g)
    targets = torch.randint(0, model.args.vocab_size, (2, 19), generator=g)
    targets[0, -1] = -1
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, :4] = False
    w_logp, w_ent = torch.randn(2, 19, generator=g), torch.randn(2, 19, generator=g)
    params = dict(model.named_parameters())
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        hidden = model.forward_hidden(ids)
        logp, ent = logprobs_from_hidden(model, hidden, targets, chunk_size=7, temperature=0.8, with_entropy=True,
                                         mask=mask, fused_head=fused)
        ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
        results.append((logp.detach(), ent.detach(),
                        {n: p.grad.clone() for n, p in params.items() if p.grad is not None}))
    (lp0, ent0, g0), (lp1, ent1, g1) = results
    torch.testing.assert_close(lp1, lp0, **TOL)
    torch.testing.assert_close(ent1, ent0, **TOL)
    assert g0.keys() == g1.keys() and "model.norm.weight" in g1 and "model.embed_tokens.weight" in g1
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_head_is_off_by_default_on_cpu_and_follows_the_module_switch(model, monkeypatch):
    assert lpm.FUSED_HEAD is None  # auto: fused on CUDA only
    calls = []
    real = lpm.fused_head_logprobs
    monkeypatch.setattr(lpm, "fused_head_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model.forward_hidden(ids)
        default = logprobs_from_hidden(model, hidden, ids, chunk_size=5)
        plain = logprobs_from_hidden(model, hidden, ids, chunk_size=5, fused_head=False)
        assert not calls and torch.equal(default, plain)  # off: today's path, bit for bit
        monkeypatch.setattr(lpm, "FUSED_HEAD", True)
        fused = logprobs_from_hidden(model, hidden, ids, chunk_size=5)
        assert calls == [1]
        torch.testing.assert_close(fused, plain, **TOL)
        logprobs_from_hidden(model, hidden, ids, chunk_size=5, fused_head=False)  # the argument wins
        assert calls == [1]


# ----------------------------------------------------------------------------------------- Triton kernels, interpreter
_INTERPRETED = textwrap.dedent('''
    import copy
    import torch
    import r1lab.train.fused_head as fh
    from r1lab.model.layers import RMSNorm

    def problem(N, d, V, seed):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(N, d, generator=g).requires_grad_()
        W = (torch.randn(V, d, generator=g) * 0.5).requires_grad_()
        norm = RMSNorm(d)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
        t = torch.randint(0, V, (N,), generator=g)
        t[1], t[N - 2] = -1, -100
        return h, W, norm, t, torch.randn(N, generator=g), torch.randn(N, generator=g)

    def run(fn, h, W, norm, w1, w2, entropy_grad):
        for p in (h, W, norm.weight):
            p.grad = None
        logp, ent = fn()
        ((logp * w1).sum() + ((ent * w2).sum() if entropy_grad else 0.0)).backward()
        return [logp.detach(), ent.detach(), h.grad.clone(), W.grad.clone(), norm.weight.grad.clone()]

    worst = 0.0
    # (rows, d, vocab, kernel tile): several tiles with a ragged last one, one partial tile, V > default tile
    for N, d, V, block in [(23, 16, 300, 64), (11, 8, 200, 4096), (9, 16, 5000, 4096)]:
        fh.BLOCK = block
        for T in (1.0, 0.6):
            h, W, norm, t, w1, w2 = problem(N, d, V, seed=V)
            # the per-chunk kernel against the torch twin: logp, entropy and the G written in place
            x = norm(h).detach()
            logits = x @ W.detach().t()
            lt, lp_t, en_t = logits.clone(), torch.empty(N), torch.empty(N)
            fh._rows_triton(lt, t, 1 / T, True, lp_t, en_t)
            lr, lp_r, en_r = logits.clone(), torch.empty(N), torch.empty(N)
            fh._rows_torch(lr, t, 1 / T, True, lp_r, en_r)
            for a, b in ((lp_t, lp_r), (en_t, en_r), (lt, lr)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
                worst = max(worst, (a - b).abs().max().item())
            a, b = torch.randn(N), torch.randn(N)
            fh._entropy_grad_triton(lt, t, lp_t, en_t, a, b, 1 / T)
            fh._entropy_grad_torch(lr, t, lp_r, en_r, a, b, 1 / T)
            torch.testing.assert_close(lt, lr, atol=1e-5, rtol=1e-5)
            # end to end (kept and recomputed chunks) against the plain log_softmax head
            h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
            norm64 = copy.deepcopy(norm).double()
            for entropy_grad in (False, True):
                def ref():  # plain log_softmax head in float64 (the exact answer)
                    z = (norm64(h64) @ W64.t()) / T
                    lp = torch.log_softmax(z, -1).gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
                    return torch.where(t >= 0, lp, 0.0), torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
                def fused():
                    return fh.fused_head_logprobs(h, W, t, norm=norm, temperature=T, with_entropy=True, chunk_size=4,
                                                  store_bytes=2 * 4 * V * 4, impl="triton")
                want = [v.float() for v in run(ref, h64, W64, norm64, w1.double(), w2.double(), entropy_grad)]
                got = run(fused, h, W, norm, w1, w2, entropy_grad)
                for name, g_, r_ in zip(("logp", "ent", "dh", "dW", "dnorm"), got, want):
                    torch.testing.assert_close(g_, r_, atol=1e-5, rtol=1e-5, msg=lambda m: f"{V} {T} {name} {m}")
                    worst = max(worst, (g_ - r_).abs().max().item())
    # bf16 logits (the GPU case; the kernels have no tl.dot, so the interpreter can run them): the same as the
    # torch twin up to one bf16 rounding of G (the interpreter may round bf16 differently from torch)
    g = torch.Generator().manual_seed(1)
    fh.BLOCK = 1024
    logits = (torch.randn(13, 5000, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, 5000, (13,), generator=g)
    t[2] = -1
    lt, lr = logits.clone(), logits.clone()
    outs = [torch.empty(13) for _ in range(4)]
    fh._rows_triton(lt, t, 1.25, True, outs[0], outs[1])
    fh._rows_torch(lr, t, 1.25, True, outs[2], outs[3])
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], outs[3], atol=1e-5, rtol=1e-5)
    assert lt.dtype == torch.bfloat16
    torch.testing.assert_close(lt.float(), lr.float(), atol=0, rtol=2 ** -7)
    a, b = torch.randn(13, generator=g), torch.randn(13, generator=g)
    lt = lr.clone()
    fh._entropy_grad_triton(lt, t, outs[2], outs[3], a, b, 1.25)
    fh._entropy_grad_torch(lr, t, outs[2], outs[3], a, b, 1.25)
    torch.testing.assert_close(lt.float(), lr.float(), atol=0, rtol=2 ** -7)
    print("kernels ok", worst)
''')


def test_triton_kernels_under_the_interpreter():
    assert "kernels ok" in run_interpreted(_INTERPRETED)


# ----------------------------------------------------------------------------------------- GPU (run with -m gpu)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_cuda_triton_equals_torch_twin_fp32(entropy_grad):
    """Compiled kernels, fp32 without TF32: same values and gradients as the torch twin (V = 152k, 3 chunks)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    h, W, norm, t, w_logp, w_ent = _problem(N=2500, d=64, V=151936, seed=5)
    h, W, t, w_logp, w_ent = (v.detach().cuda() for v in (h, W, t, w_logp, w_ent))
    h.requires_grad_(), W.requires_grad_()
    norm = norm.cuda()
    out = {}
    for impl in ("torch", "triton"):
        out[impl] = _values_and_grads(
            lambda impl=impl: fused_head_logprobs(h, W, t, norm=norm, temperature=0.9, with_entropy=True,
                                                  chunk_size=1024, store_bytes=1024 * 151936 * 4, impl=impl),
            h, W, norm, w_logp, w_ent, entropy_grad)
    assert fh._use_triton("auto", h.device)
    # The norm weight's gradient sums 2,500 rows of [d] products of 152k-long GEMM reductions: on the H200
    # the two orders of summation differed by up to 4.0e-5 (1.3e-4 relative) there, 1e-5 everywhere else.
    _assert_all_close(out["triton"], out["torch"], "triton vs torch",
                      tolerances={"grad norm": dict(atol=2e-4, rtol=1e-3)})


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("setup", ["bf16-model", "fp32-autocast"])
def test_cuda_bf16_tracks_fp32_reference(setup, monkeypatch):
    """Qwen2.5-0.5B head shape (d 896, V 152k), 2 layers: the fused head in bf16 (bf16 weights, or fp32 master
    weights under bf16 autocast) against an fp32 reference of the same weights, no worse than today's path."""
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setattr(fh, "STORE_BYTES", 400 * 2**20)  # 1 of the 3 chunks kept, 2 recomputed
    args = rm.preset("qwen2.5-0.5b", num_hidden_layers=2, initializer_range=0.05)
    base = rm.build(args, seed=0, dtype=torch.bfloat16, device="cuda").float()  # bf16-representable weights
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, args.vocab_size, (2, 1300), generator=g).cuda()
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -1
    w = torch.randn(ids.shape, generator=g).cuda()

    def run(model, fused, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            hidden = model.forward_hidden(ids)
            logp, ent = logprobs_from_hidden(model, hidden, targets, with_entropy=True, fused_head=fused)
        (logp * w).sum().backward()
        return logp.detach(), ent.detach(), model.lm_head.weight.grad.float(), model.model.norm.weight.grad.float()

    ref = run(base, False, False)
    model = base if setup == "fp32-autocast" else rm.build(args, seed=0, dtype=torch.bfloat16, device="cuda")
    autocast = setup == "fp32-autocast"
    plain, fused = run(model, False, autocast), run(model, True, autocast)
    if autocast:  # fp32 master weights keep fp32 gradients (summed over chunks in fp32)
        assert model.lm_head.weight.grad.dtype == torch.float32
    for k, name in enumerate(["logp", "entropy"]):
        err, err_plain = (fused[k] - ref[k]).abs().max().item(), (plain[k] - ref[k]).abs().max().item()
        assert err < 0.15 and err <= 1.5 * err_plain + 0.01, (name, err, err_plain)
    for k, name in [(2, "grad head"), (3, "grad norm")]:
        err, err_plain = _rel(fused[k], ref[k]), _rel(plain[k], ref[k])
        assert err < 0.1 and err <= 1.5 * err_plain + 0.005, (name, err, err_plain)


@pytest.mark.gpu
@cuda
def test_cuda_memory_stays_within_the_store_budget():
    """16 chunks of 1024 rows × 152k vocabulary (5 GB of bf16 gradient if all were kept): with a 1 GiB budget
    the forward's extra memory stays under budget + 2 chunks; everything kept needs ~5 GB."""
    V, d, N = 151936, 896, 16384
    W = (torch.randn(V, d, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    h = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, V, (N,), device="cuda")
    chunk_bytes = 1024 * V * 2
    peaks = {}
    for store in (2**30, float("inf")):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        logp = fused_head_logprobs(h, W, t, chunk_size=1024, store_bytes=store)
        peaks[store] = torch.cuda.max_memory_allocated() - start
        logp.sum().backward()
        del logp
        h.grad = W.grad = None
    assert peaks[2**30] < 2**30 + 2 * chunk_bytes + 64 * 2**20, peaks
    assert peaks[float("inf")] > 15 * chunk_bytes, peaks
