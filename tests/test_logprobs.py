"""Chunked log-probs equal the full-logits reference (values and gradients) and never keep [N, V] logits;
the MTP loss built on them equals its full-logits definition."""

import pytest
import torch
import torch.nn.functional as F

import r1lab.model as rm
import r1lab.train.logprobs as logprobs_module
from r1lab.train.logprobs import entropy_from_logits, logprobs_from_hidden, mtp_loss_sums, token_logprobs


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe"])
def model(request):
    return rm.build(rm.preset(request.param), seed=0)


def _batch(V, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _reference(model, ids, targets, temperature=1.0):
    logits = model(ids).float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1), entropy_from_logits(logits)


def test_values_match_full_logits(model):
    ids, targets = _batch(model.args.vocab_size)
    with torch.no_grad():
        ref, ref_ent = _reference(model, ids, targets, temperature=0.7)
        lp, ent = token_logprobs(model, ids, targets, chunk_size=5, temperature=0.7, with_entropy=True)
        plain = token_logprobs(model, ids, targets, chunk_size=7)
    assert lp.dtype == torch.float32 and lp.shape == ids.shape
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, _reference(model, ids, targets)[0].detach(), atol=1e-5, rtol=0)


def test_gradients_match_full_logits(model):
    model.train()
    ids, targets = _batch(model.args.vocab_size, seed=1)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn() * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(lambda: _reference(model, ids, targets)[0])
    got = grads(lambda: token_logprobs(model, ids, targets, chunk_size=6))
    model.eval()
    assert ref.keys() == got.keys() and "model.embed_tokens.weight" in got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_mask_computes_only_selected_positions(model):
    ids, targets = _batch(model.args.vocab_size, seed=3)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, 9:12] = True
    hidden = model.forward_hidden(ids).detach().requires_grad_()
    full = logprobs_from_hidden(model, hidden, targets, chunk_size=4)
    (full * mask).sum().backward()
    ref_grad, hidden.grad = hidden.grad.clone(), None
    part, ent = logprobs_from_hidden(model, hidden, targets, chunk_size=4, mask=mask, with_entropy=True)
    torch.testing.assert_close(part, torch.where(mask, full, 0.0).detach(), atol=1e-6, rtol=0)
    assert (ent[~mask] == 0).all() and (ent[mask] > 0).all()
    part.sum().backward()
    torch.testing.assert_close(hidden.grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_negative_targets_give_zero():
    model = rm.build(rm.preset("tiny-dense"), seed=0)
    ids, targets = _batch(model.args.vocab_size, T=6)
    targets = targets.clone()
    targets[0, -1] = -1
    with torch.no_grad():
        lp = token_logprobs(model, ids, targets, chunk_size=4)
    assert lp[0, -1] == 0 and (lp[1] < 0).all()


def test_saved_tensors_never_hold_vocab_sized_logits():
    """Everything autograd keeps for the backward is recorded through saved_tensors_hooks; the chunked head
    must keep nothing with a vocabulary dimension (its logits are recomputed), while the naive head keeps
    several [N, V] tensors (this checks that the probe sees them)."""
    model = rm.build(rm.preset("tiny-dense", vocab_size=1024), seed=0)
    V, d = model.args.vocab_size, model.args.hidden_size
    B, T, chunk = 4, 64, 32
    hidden = torch.randn(B, T, d, requires_grad=True)
    targets = torch.randint(0, V, (B, T))

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, shapes

    out, shapes = saved_shapes(lambda: logprobs_from_hidden(model, hidden, targets, chunk_size=chunk))
    assert shapes, "the probe saw nothing"
    assert all(V not in s for s in shapes), shapes
    total = sum(torch.Size(s).numel() for s in shapes)
    assert total <= B * T * (d + 1)  # the hidden chunks + targets only, far below B·T·V
    out.sum().backward()  # and the recomputing backward works
    assert hidden.grad is not None and model.lm_head.weight.grad is not None

    _, naive = saved_shapes(
        lambda: torch.log_softmax(model.logits(hidden).float(), -1).gather(-1, targets[..., None])
    )
    assert sum(torch.Size(s).numel() for s in naive if V in s) >= B * T * V


def _mtp_reference(model, hidden, ids, loss_mask):
    """V3 eq. 24-25 by hand for one MTP depth: module 1 at position i sees h_i and emb(token i+1) and predicts
    token i+2; full fp32 logits; mean CE over the counted predictions (loss_mask shifted like
    PackedBatch.loss_mask: loss_mask[:, j] = predicting token j+1 counts)."""
    B, T = ids.shape
    mod = model.mtp[0]
    emb = model.model.embed_tokens(ids)
    x = mod.eh_proj(torch.cat([mod.enorm(emb[:, 1:]), mod.hnorm(hidden[:, :-1])], -1))
    h = super(type(mod), mod).forward(x, model.context(torch.arange(T - 1).expand(B, T - 1)))
    logits = model.lm_head(mod.shared_head.norm(h))[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1), reduction="none")
    w = loss_mask[:, 1 : T - 1].reshape(-1).float()
    return (ce * w).sum() / w.sum()


@pytest.mark.parametrize("masked", [False, True])
def test_mtp_loss_is_cross_entropy_of_token_two_ahead(masked):
    model = rm.build(rm.preset("tiny-moe"), seed=8)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.args.vocab_size, (2, 12), generator=g)
    loss_mask = torch.rand(2, 12, generator=g) < 0.6 if masked else torch.ones(2, 12, dtype=torch.bool)
    hidden = model.forward_hidden(ids)
    mtp_sum, count = mtp_loss_sums(model, hidden, ids, loss_mask=loss_mask if masked else None, chunk_size=5)
    expected = _mtp_reference(model, hidden, ids, loss_mask)
    assert count.item() == loss_mask[:, 1:11].sum().item()
    torch.testing.assert_close(mtp_sum / count, expected)
    # gradients too (through the chunked, checkpointed head and the MTP block), w.r.t. every parameter
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(mtp_sum / count, params, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for p, a, b in zip(params, got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_mtp_and_main_loss_fused_head_match_plain_on_cuda(monkeypatch):
    """Pretraining's CE and the MTP loss take the fused head on CUDA: same values and gradients as the plain
    chunked head (fp32 weights, random mask)."""
    model = rm.build(rm.preset("tiny-moe"), seed=0).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.args.vocab_size, (4, 64), device="cuda", generator=g)
    mask = torch.rand(4, 64, device="cuda", generator=g) < 0.7
    results = []
    for fused in (False, True):
        monkeypatch.setattr(logprobs_module, "FUSED_HEAD", fused)  # the default both losses take
        model.zero_grad()
        hidden = model.forward_hidden(ids)
        mtp_sum, count = mtp_loss_sums(model, hidden, ids, loss_mask=mask)
        ce = -logprobs_from_hidden(model, hidden, ids.roll(-1, 1)).mean()
        (mtp_sum / count + ce).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((mtp_sum / count, ce, grads))
    (mtp0, ce0, g0), (mtp1, ce1, g1) = results
    torch.testing.assert_close(mtp1, mtp0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ce1, ce0, atol=1e-4, rtol=1e-4)
    assert ((g1 - g0).norm() / g0.norm()).item() < 1e-3
