"""r1lab's model against transformers' own LlamaForCausalLM / Qwen2ForCausalLM / DeepseekV3ForCausalLM."""

from __future__ import annotations

import random

import pytest
import torch

import r1lab.model as rm
from hf_reference import hf_logits, random_deepseek_config, random_dense_config, transformers, write_hf_checkpoint

TOL = 1e-4


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL * max(scale, 1.0), f"max |Δlogit| {err:.3e} vs scale {scale:.3e}"


def random_ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


CASES = [
    ("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("mistral", False),
]


@pytest.mark.parametrize("model_type,v5", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_logits_match_transformers(tmp_path, model_type, v5, seed):
    cfg = random_dense_config(model_type, random.Random(seed * 7 + len(model_type)), v5_rope=v5)
    ref = write_hf_checkpoint(cfg, tmp_path / "hf", seed)
    ours = rm.load(tmp_path / "hf")
    ids = random_ids(cfg["vocab_size"], 3, 19, seed)
    assert_close_rel(ours(ids), hf_logits(ref, ids))


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("yarn", [True, False])
@pytest.mark.parametrize("v5", [True, False])
def test_deepseek_v3_logits_match_transformers(tmp_path, q_lora, yarn, v5):
    seed = 10 + 4 * q_lora + 2 * yarn + v5
    cfg = random_deepseek_config(random.Random(seed), q_lora=q_lora, yarn=yarn, v5_rope=v5)
    ref = write_hf_checkpoint(cfg, tmp_path / "hf", seed)
    ours = rm.load(tmp_path / "hf", moe_impl="loop")
    ids = random_ids(cfg["vocab_size"], 2, 23, seed)
    assert_close_rel(ours(ids), hf_logits(ref, ids))
    # The routing really is decisive and uses the correction bias: zeroing it changes our logits.
    for m in ours.moe_layers():
        m.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        assert (ours(ids) - hf_logits(ref, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_save_then_transformers_load_gives_same_logits(tmp_path, preset):
    args = rm.preset(preset, num_nextn_predict_layers=0)
    model = rm.build(args, seed=3).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.2)
            m.gate.weight.normal_(0, 0.5)
    rm.save(model, tmp_path / "ckpt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    ids = random_ids(args.vocab_size, 2, 17, 5)
    with torch.no_grad():
        assert_close_rel(model(ids), hf_logits(ref, ids))


def test_save_load_roundtrip_keeps_mtp_and_router_bias(tmp_path):
    model = rm.build(rm.preset("tiny-moe"), seed=4)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.3)
    rm.save(model, tmp_path / "ckpt", max_shard_bytes=200_000)  # forces several shards + index json
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    again = rm.load(tmp_path / "ckpt")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    L = model.args.num_hidden_layers
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.7.down_proj.weight"):
        assert f"model.layers.{L}.{key}" in names, key
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
