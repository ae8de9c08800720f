"""Build transformers' own models on random tiny configs: the references r1lab's model must match."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")


def random_dense_config(model_type: str, rnd: random.Random, v5_rope: bool = False) -> dict:
    heads = rnd.choice([2, 4])
    kv = rnd.choice([h for h in (1, 2, 4) if heads % h == 0])
    head_dim = rnd.choice([8, 16])
    cfg = dict(
        model_type=model_type, vocab_size=rnd.choice([97, 128]), hidden_size=heads * head_dim,
        intermediate_size=rnd.choice([40, 64]), num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv, rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=rnd.random() < 0.5, bos_token_id=1, eos_token_id=2,
    )
    theta = rnd.choice([10000.0, 1e6])
    scaling = None
    if model_type == "llama" and rnd.random() < 0.5:
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64)
    if model_type == "llama":
        cfg["attention_bias"] = rnd.random() < 0.5
    return _with_rope(cfg, theta, scaling, v5_rope)


def random_deepseek_config(rnd: random.Random, *, q_lora: bool, yarn: bool, v5_rope: bool = False) -> dict:
    cfg = dict(
        model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32 if q_lora else None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=rnd.choice([16, 12]),
        n_routed_experts=8, n_shared_experts=rnd.choice([1, 2]), num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, max_position_embeddings=256,
        rope_interleave=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    scaling = None
    if yarn:
        scaling = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32,
                       beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    return _with_rope(cfg, 10000.0, scaling, v5_rope)


def _with_rope(cfg: dict, theta: float, scaling: dict | None, v5: bool) -> dict:
    if v5:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    else:
        cfg["rope_theta"] = theta
        if scaling:
            legacy = dict(scaling)
            legacy["type"] = legacy.pop("rope_type")  # the oldest spelling, as in DeepSeek-V3's own config.json
            cfg["rope_scaling"] = legacy
    return cfg


def write_hf_checkpoint(cfg: dict, folder: Path, seed: int) -> "transformers.PreTrainedModel":
    """Random-init transformers' model for cfg (weights perturbed so routing is decisive) and save it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08 if "gate.weight" not in name else 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.2 * torch.randn_like(buf))
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg))  # keep the exact v4/v5 form under test
    return model.eval()


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
