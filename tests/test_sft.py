"""SFT: loss on response tokens only, packing = no packing, memorization, exact resume after a crash."""

import json
import random

import pytest
import torch
from resume_check import assert_resume_after_crash_equals_uninterrupted

import r1lab.model as rm
from r1lab.rollout import SamplingParams, generate
from r1lab.tokenizer import train_bpe
from r1lab.train.batching import pack_sequences
from r1lab.train.logprobs import mtp_loss_sums
from r1lab.run_dir import read_jsonl
from r1lab.train.sft import (
    SFTConfig,
    encode_dataset,
    encode_example,
    sft_loss_sums,
    train_sft,
)

NAMES = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon").split()
WORDS = "red blue green cat dog sun moon tree fish bird".split()


def _records(n=20, seed=0):
    rnd = random.Random(seed)
    return [{"prompt": f"Question {name}:", "completion": " ".join(rnd.choice(WORDS) for _ in range(3))}
            for name in NAMES[:n]]


@pytest.fixture(scope="module")
def tok():
    texts = [f"{r['prompt']} {r['completion']}" for r in _records()] * 3
    texts.append("<think> x </think> <answer> 1 </answer> user assistant")
    return train_bpe(texts, vocab_size=300)


def _model(tok, preset="tiny-dense", seed=0):
    return rm.build(rm.preset(preset, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id), seed=seed)


def test_encode_marks_response_and_eos(tok):
    ids, mask = encode_example({"prompt": "Question alpha:", "completion": "red cat"}, tok)
    prompt_len = len(tok.encode("Question alpha:"))
    assert ids[:prompt_len] == tok.encode("Question alpha:")  # prompt tokens as the rollout engine sees them
    assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len)
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids) == "Question alpha: red cat" + tok.eos_token
    # chat: only the assistant turn is trained, the newline after the end-of-turn token is not
    ids, mask = encode_example({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "red cat"}]}, tok, template="chat")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "red cat<|im_end|>"
    with pytest.raises(ValueError, match="template='chat'"):
        encode_example({"messages": []}, tok)


def test_overlong_drop_and_truncate(tok):
    recs = _records(4) + [{"prompt": "Question long:", "completion": " ".join(["moon"] * 40)}]
    dropped = encode_dataset(recs, tok, SFTConfig(data=recs, max_len=24, micro_batch_tokens=64))
    assert (len(dropped.seqs), dropped.dropped, dropped.truncated) == (4, 1, 0)
    cut = encode_dataset(recs, tok, SFTConfig(data=recs, max_len=24, micro_batch_tokens=64, overlong="truncate"))
    assert (len(cut.seqs), cut.dropped, cut.truncated) == (5, 0, 1) and max(map(len, cut.seqs)) == 24


def _loss(model, batches):
    sums = [sft_loss_sums(model, b) for b in batches]
    return sum(s["ce_sum"] for s in sums) / sum(s["tokens"] for s in sums)


def test_loss_counts_response_tokens_only(tok):
    model = _model(tok)
    enc = [encode_example(r, tok) for r in _records(4)]
    batch = pack_sequences([e[0] for e in enc], [e[1] for e in enc], 256)[0]
    base = _loss(model, [batch])
    prompt_targets = (~batch.loss_mask) & (batch.targets >= 0)
    assert prompt_targets.any()
    batch.targets[prompt_targets] = (batch.targets[prompt_targets] + 7) % tok.vocab_size
    assert torch.equal(_loss(model, [batch]), base)  # changing prompt targets: same loss
    batch.targets[batch.loss_mask] = (batch.targets[batch.loss_mask] + 7) % tok.vocab_size
    assert not torch.allclose(_loss(model, [batch]), base)  # changing response targets: different loss


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_packed_loss_equals_unpacked(tok, preset):
    model = _model(tok, preset).train()
    enc = [encode_example(r, tok) for r in _records(6)]
    seqs, masks = [e[0] for e in enc], [e[1] for e in enc]
    packed = pack_sequences(seqs, masks, 512)
    assert len(packed) == 1 and len(packed[0].seq_index) == 6
    alone = [pack_sequences([s], [m], 512)[0] for s, m in zip(seqs, masks)]
    torch.testing.assert_close(_loss(model, packed), _loss(model, alone), atol=1e-5, rtol=0)
    if preset == "tiny-moe":  # the document-aware MTP loss matches too (one MTP depth: sums are exact)
        mtp = [sft_loss_sums(model, b, with_mtp=True) for b in (*packed, *alone)]
        packed_mtp = mtp[0]["mtp_sum"] / mtp[0]["mtp_tokens"]
        alone_mtp = sum(m["mtp_sum"] for m in mtp[1:]) / sum(m["mtp_tokens"] for m in mtp[1:])
        torch.testing.assert_close(packed_mtp, alone_mtp, atol=1e-5, rtol=0)
        # and, for one sequence alone, the document-aware path equals the plain one (no positions / doc ids)
        b = alone[0]
        hidden = model.forward_hidden(b.input_ids)
        plain_sum, plain_n = mtp_loss_sums(model, hidden, b.input_ids, loss_mask=b.loss_mask)
        assert plain_n.item() == mtp[1]["mtp_tokens"].item() > 0
        torch.testing.assert_close(mtp[1]["mtp_sum"], plain_sum, atol=1e-5, rtol=0)


def test_memorizes_twenty_examples(tok, tmp_path):
    recs = _records(20)
    cfg = SFTConfig(data=recs, epochs=40, lr=1e-2, warmup_steps=3, weight_decay=0.0, tokens_per_step=10_000,
                    micro_batch_tokens=512, max_len=64, save_every=0)
    model = train_sft(cfg, tmp_path, model=_model(tok), tokenizer=tok, log=lambda s: None)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(metrics) == 40 and metrics[-1]["loss"] < 0.2 * metrics[0]["loss"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= metrics[0].keys()
    outs = generate(model, [tok.encode(r["prompt"]) for r in recs], SamplingParams(temperature=0, max_new_tokens=8))
    texts = [tok.decode([t for t in c.token_ids if t not in tok.stop_ids]).strip() for c in outs]
    assert sum(t == r["completion"] for t, r in zip(texts, recs)) >= 18
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["examples"] == 20 and summary["steps"] == 40
    assert "in-memory" in (tmp_path / "config.yaml").read_text()


def test_resume_after_crash_equals_uninterrupted(tok, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(8)))
    tok.save(tmp_path / "tok")
    cfg = SFTConfig(model="tiny-moe", tokenizer=str(tmp_path / "tok"), data=str(data), epochs=2, lr=3e-3,
                    warmup_steps=2, tokens_per_step=40, micro_batch_tokens=64, max_len=64, save_every=2)
    assert_resume_after_crash_equals_uninterrupted(train_sft, cfg, tmp_path)  # step 2: logged, not saved
    loaded = rm.load(tmp_path / "crashed" / "model")
    assert loaded.args.model_type == "deepseek_v3"
