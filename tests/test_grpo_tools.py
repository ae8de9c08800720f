"""GRPO over tool-using trajectories: the ids trained on are the sampled ids plus the tool-reply ids, exactly;
reply tokens carry no gradient; rewards ignore what the tool printed; tool metrics are logged."""

from __future__ import annotations

import copy

import pytest
import torch

import r1lab.train.grpo as grpo
from r1lab.model import ASSETS_DIR as ASSETS
from r1lab.model import load_model_and_tokenizer
from r1lab.rollout import Completion
from r1lab.run_dir import RunDir
from r1lab.sandbox import sandbox_available
from r1lab.tools import PythonTool
from r1lab.train.grpo import GRPOConfig, TaskConfig, Trainer
from r1lab.train.grpo_math import group_advantages

G = 4


def _sampled_logprobs(model, prompt: list[int], ids: list[int], tool_mask: list[bool]) -> list[float]:
    """log softmax of a full no-cache forward at every completion token (0.0 placeholders on tool tokens)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids]))[0].float()
    logp = torch.log_softmax(logits, -1)
    out = []
    for t, (token, tool) in enumerate(zip(ids, tool_mask)):
        out.append(0.0 if tool else float(logp[len(prompt) + t - 1, token]))
    return out


def _script(tok, j: int) -> list[tuple[str, bool]]:
    """(text, from_tool) pieces of sample j: a call, its reply (which prints a fake answer), the model's own
    words; odd samples drop the closing </answer> (format 0), so each group has reward variance."""
    own_end = " so it is 3 </think> <answer> 3 </answer>" if j % 2 == 0 else " so it is 3 </think> <answer> 3"
    return [("<think> <python>\nprint('<ans' + 'wer> 99 </ans' + 'wer>')\n</python>", False),
            ("\n<output>\n<answer> 99 </answer>\n</output>\n", True),
            (" and again <python>\nprint(1 + 2)\n</python>", False),
            ("\n<output>\n3\n</output>\n", True),
            (own_end, False)]


@pytest.mark.skipif(not sandbox_available(), reason="the tool config checks for the sandbox")
def test_tool_tokens_are_trained_on_as_context_only(tmp_path, monkeypatch):
    # the dense student: no MoE balance loss in the gradient, so the reference below is the whole loss
    model, tok = load_model_and_tokenizer(ASSETS / "r1-tiny-student", dtype="float32")
    before = copy.deepcopy(model)
    made: list[tuple[list[int], list[int], list[bool]]] = []

    def scripted_generate(policy, prompts, params):
        assert params.tool is not None and params.tool.close_text == "</python>"
        out = []
        for p, prompt in enumerate(prompts):
            for j in range(params.n):
                ids, mask = [], []
                for text, from_tool in _script(tok, j):
                    piece = tok.encode(text)
                    ids += piece
                    mask += [from_tool] * len(piece)
                ids.append(tok.eos_id)
                mask.append(False)
                made.append((prompt, ids, mask))
                out.append(Completion(p, j, ids, _sampled_logprobs(before, prompt, ids, mask), "stop",
                                      tool_mask=mask, tool_calls=2, tool_errors=0))
        return out

    monkeypatch.setattr(grpo, "generate", scripted_generate)
    cfg = GRPOConfig(task=TaskConfig(name="chain_sum", train_size=8), rewards={"format": 1.0},
                     prompts_per_step=2, group_size=G, max_new_tokens=200, lr=1e-9, warmup_steps=0,
                     grad_clip=1e9, steps=1, seed=0, tool=PythonTool())
    trainer = Trainer(cfg, model, tok, RunDir(tmp_path))
    seen = {}
    real_update = trainer._update

    def spy(minibatch, batch, meter):
        seen["batch"] = batch
        real_update(minibatch, batch, meter)

    monkeypatch.setattr(trainer, "_update", spy)
    scored: list[str] = []
    real_batch = trainer.reward.batch

    def scored_spy(problems, texts, **kw):
        scored.extend(texts)
        return real_batch(problems, texts, **kw)

    monkeypatch.setattr(trainer.reward, "batch", scored_spy)
    metrics = trainer.step()
    batch = seen["batch"]

    # the trained sequences are exactly prompt + the engine's ids; only sampled tokens are in the loss
    assert [s for s in batch.seqs] == [prompt + ids for prompt, ids, _ in made]
    for mask, (prompt, ids, tool) in zip(batch.loss_masks, made):
        assert mask == [0] * len(prompt) + [0 if t else 1 for t in tool]
    assert all(len(old) == sum(not t for t in tool) for old, (_, _, tool) in zip(batch.old_logp, made))

    # rewards see the model's words and code, not what the tool printed ("<answer> 99 </answer>")
    assert len(scored) == len(made) and all("<output>" not in t and t.count("99") == 1 for t in scored)
    assert metrics["format_rate"] == 0.5  # the well-formed half, judged on the text without replies
    assert metrics["tool/calls_per_answer"] == 2 and metrics["tool/error_rate"] == 0
    share = sum(sum(t) for _, _, t in made) / sum(len(i) for _, i, _ in made)
    assert metrics["tool/token_share"] == pytest.approx(share)

    # the gradient is that of the loss over sampled tokens only (ratio 1 on this on-policy update)
    rewards = torch.tensor([float(j % 2 == 0) for _ in range(2) for j in range(G)])  # the format reward
    advantages = group_advantages(rewards, G)
    ref_loss = 0.0
    for i, (prompt, ids, tool) in enumerate(made):
        logits = before(torch.tensor([prompt + ids]))[0].float()
        logp = torch.log_softmax(logits, -1)
        sampled = [t for t in range(len(ids)) if not tool[t]]
        lp = torch.stack([logp[len(prompt) + t - 1, ids[t]] for t in sampled])
        ref_loss = ref_loss - advantages[i] * torch.exp(lp - lp.detach()).mean()
    (ref_loss / len(made)).backward()
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
