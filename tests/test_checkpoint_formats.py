"""Checkpoint layouts users have besides r1lab's own: DeepSeek-V3 folders written by transformers (no MTP
tensors) and block-quantized FP8 weights as DeepSeek-V3/R1 and Kimi-K2 ship them."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import save_file

import r1lab.model as rm
from r1lab.errors import InputError
from r1lab.model.hf_io import checkpoint_state

transformers = pytest.importorskip("transformers")

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


# ----------------------------------------------------------------------------- DeepSeek-V3 without MTP tensors
def _transformers_deepseek(folder, seed: int):
    """transformers' own tiny DeepseekV3ForCausalLM, saved by save_pretrained: its config.json asks for one MTP
    module (num_nextn_predict_layers=1) and its safetensors hold none."""
    config = transformers.DeepseekV3Config(
        vocab_size=120, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:  # larger than the init so that the router's choice is decisive, not a near-tie
                p.normal_(0, 0.5 if name.endswith("mlp.gate.weight") else 0.08)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.2 * torch.randn_like(buf))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_transformers_deepseek_v3_folder_loads_without_mtp(tmp_path, caplog, seed):
    ref = _transformers_deepseek(tmp_path / "hf", seed)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with caplog.at_level(logging.WARNING, logger="r1lab.model"):
        ours = rm.load(tmp_path / "hf", moe_impl="loop")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "hf") in warnings[0] and "without MTP" in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert len(ours.mtp) == 0 and ours.args.num_nextn_predict_layers == 0
    assert not any(name.startswith("mtp.") for name in ours.state_dict())
    ids = torch.randint(0, 120, (2, 21), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(ids)
    err = (got - expected).abs().max().item()
    assert err <= 1e-4 * max(expected.abs().max().item(), 1.0), err
    # r1lab's own save of it says what it holds: it reloads with no warning.
    rm.save(ours, tmp_path / "again")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1lab.model"):
        rm.load(tmp_path / "again")
    assert not caplog.records


def test_partial_mtp_tensors_stay_an_error(tmp_path):
    from safetensors.torch import load_file

    model = rm.build(rm.preset("tiny-moe"), seed=2)
    path = rm.save(model, tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    L = model.args.num_hidden_layers
    del state[f"model.layers.{L}.eh_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(rm.CheckpointError, match=r"missing tensors: mtp\.0\.eh_proj\.weight"):
        rm.load(path)


# ----------------------------------------------------------------------------- block-wise FP8
def _fp8_model(seed: int) -> rm.Transformer:
    """A tiny DeepSeek-V3 whose widths are mostly not multiples of 128, so blocks at the edges are partial."""
    args = rm.ModelArgs(
        model_type="deepseek_v3", vocab_size=300, hidden_size=160, intermediate_size=200, moe_intermediate_size=136,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=96, kv_lora_rank=72, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=40, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=128, moe_impl="loop",
    )
    model = rm.build(args, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.weight.normal_(0, 0.5, generator=gen)
        for name, p in model.named_parameters():
            if name.endswith("_proj") or name.endswith("_proj.weight"):
                # 128-wide bands of different ranges: each block needs its own scale, and a scale applied to
                # the wrong block is off by up to 16x
                for w in p.view(-1, *p.shape[-2:]):
                    for band in w.split(BLOCK, dim=-1):
                        band.mul_(2.0 ** torch.randint(-2, 3, (), generator=gen).item())
    return model


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe: per 128x128 block, scale_inv = amax / 448 and fp8 = w / scale_inv."""
    rows, cols = w.shape
    R, C = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(R * BLOCK, C * BLOCK)
    padded[:rows, :cols] = w
    blocks = padded.view(R, BLOCK, C, BLOCK)
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale_inv[:, None, :, None]).view(R * BLOCK, C * BLOCK)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale_inv.float()


def _reference_dequant(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    R, C = scale_inv.shape
    padded = torch.zeros(R * BLOCK, C * BLOCK)
    padded[:rows, :cols] = q.float()
    return (padded.view(R, BLOCK, C, BLOCK) * scale_inv[:, None, :, None]).view(R * BLOCK, C * BLOCK)[:rows, :cols]


def _is_quantized(name: str, t: torch.Tensor) -> bool:
    # As released: every linear projection; not the embedding, norms, router (mlp.gate) or heads.
    return t.dim() == 2 and name.endswith("_proj.weight")


def _write_fp8_folder(model: rm.Transformer, folder, qcfg: dict | None = None):
    """The released layout: quantized weights and their scales spread over three shards plus an index; one
    scale sits in another shard than its weight."""
    state = checkpoint_state(model)
    out, dequantized = {}, {}
    for name, t in state.items():
        if _is_quantized(name, t):
            q, s = _quantize(t.float())
            out[name], out[name + "_scale_inv"] = q, s
            dequantized[name] = _reference_dequant(q, s)
        else:
            out[name] = t
    shards = [[], [], []]
    for name in sorted(out):  # by layer, as released: a weight and its scale share a shard
        layer = name.split(".")[2] if name.startswith("model.layers.") else "-1"
        shards[(int(layer) + 1) % 3].append(name)
    moved = next(n for n in shards[1] if n.endswith("_scale_inv"))
    shards[1].remove(moved)
    shards[2].append(moved)
    folder.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-00003.safetensors"
        save_file({n: out[n] for n in shard}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = model.args.to_hf_config()
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = qcfg or {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [BLOCK, BLOCK]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return dequantized


def test_fp8_block_quantized_checkpoint_is_dequantized(tmp_path):
    model = _fp8_model(seed=3)
    expected = _write_fp8_folder(model, tmp_path / "fp8")
    ragged = [n for n, w in expected.items() if w.shape[0] % BLOCK or w.shape[1] % BLOCK]
    multi = [n for n, w in expected.items() if w.shape[0] > BLOCK and w.shape[1] > BLOCK]
    assert ragged and multi
    loaded = rm.load(tmp_path / "fp8", dtype=torch.float32)
    assert next(loaded.parameters()).dtype == torch.float32
    ours = checkpoint_state(loaded)
    original = checkpoint_state(model)
    assert ours.keys() == original.keys()
    for name, w in original.items():
        if name in expected:
            torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=0, msg=name)
            # e4m3 keeps 3 mantissa bits (relative step 2^-3, rounding error half that); values far below
            # their block's amax fall into subnormals, whose spacing is 2^-9 of the scale.
            scale = w.abs().amax()
            assert ((ours[name] - w).abs() <= 2**-4 * w.abs() + scale / FP8_MAX * 2**-9 + 1e-7).all(), name
            assert not torch.equal(ours[name], w), name
        else:
            assert torch.equal(ours[name], w), name  # unquantized tensors come through bit for bit
    # The model is the de-quantized checkpoint: the same logits as those weights written as plain floats...
    plain = {n: expected.get(n, w).contiguous() for n, w in original.items()}
    (tmp_path / "dequantized").mkdir()
    save_file(plain, str(tmp_path / "dequantized" / "model.safetensors"))
    (tmp_path / "dequantized" / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    reference = rm.load(tmp_path / "dequantized", dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, dequantized, unquantized = loaded(ids), reference(ids), model(ids)
    torch.testing.assert_close(got, dequantized, rtol=1e-5, atol=1e-5)
    # ...and near the unquantized model's: ~3% noise in every projection compounds over the layers of a random
    # model, and a misplaced block scale (off by up to 16x) would take the logits much further.
    rel = ((got - unquantized).norm() / unquantized.norm()).item()
    assert rel < 0.2, rel
    # the folder r1lab saves from it is a plain float checkpoint
    rm.save(loaded, tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert rm.load(tmp_path / "plain").state_dict().keys() == loaded.state_dict().keys()


def test_fp8_default_dtype_is_the_configs(tmp_path):
    _write_fp8_folder(_fp8_model(seed=4), tmp_path / "fp8")
    assert next(rm.load(tmp_path / "fp8").parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("qcfg,field", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "activation_scheme"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
])
def test_unsupported_quantization_config_is_one_line(tmp_path, qcfg, field):
    _write_fp8_folder(_fp8_model(seed=5), tmp_path / "q", qcfg=qcfg)
    with pytest.raises(InputError) as info:
        rm.load(tmp_path / "q")
    message = str(info.value)
    assert "\n" not in message and "config.json" in message and f"quantization_config.{field}" in message, message


def test_fp8_scale_of_wrong_shape_is_named(tmp_path):
    from safetensors import safe_open

    _write_fp8_folder(_fp8_model(seed=6), tmp_path / "q")
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    shard = tmp_path / "q" / index[name]
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(InputError, match=r"down_proj\.weight_scale_inv has shape \(2, 1\)"):
        rm.load(tmp_path / "q")
