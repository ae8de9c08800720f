"""Named model shapes: tiny ones for tests and the CPU default, real ones for benchmarks (random weights)."""

from __future__ import annotations

from .config import ModelArgs

PRESETS: dict[str, dict] = {
    # Tests and laptop runs.
    "tiny-dense": dict(
        model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "tiny-moe": dict(
        model_type="deepseek_v3", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=512,
    ),
    # The embedded default base model (DeepSeek-V3 architecture at tiny scale; vocab set by its tokenizer).
    "r1-tiny": dict(
        model_type="deepseek_v3", vocab_size=640, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=512,
    ),
    # The larger GPU base of the R1-Zero demo: ~58M total / ~15M active parameters, same architecture.
    "r1-small": dict(
        model_type="deepseek_v3", vocab_size=640, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=16,
        v_head_dim=48, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=384,
        n_group=4, topk_group=2, routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=512,
    ),
    # Benchmark shapes (Qwen2.5 tables in the technical reference).
    "qwen2.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768,
        tie_word_embeddings=True, eos_token_id=151645,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768,
        tie_word_embeddings=True, eos_token_id=151645,
    ),
    # Too large to train on one 141 GB GPU with AdamW (16 bytes of fp32 state per parameter: 235 GB): the
    # multi-GPU demonstration shape.
    "qwen2.5-14b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=32768,
        tie_word_embeddings=False, eos_token_id=151645,
    ),
    # ~1B total / ~0.2B active MoE+MLA in DeepSeek-V3's proportions (vocab shared with Qwen's tokenizer).
    "moe-1b": dict(
        model_type="deepseek_v3", vocab_size=151936, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
        num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, moe_intermediate_size=384,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=32768,
        eos_token_id=151645,
    ),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})
