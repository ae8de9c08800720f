"""Damaged model folders: each gives one InputError line naming the file and the field, through the library and
through the `r1lab` command (exit status 2, no traceback)."""

from __future__ import annotations

import json
import random
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import r1lab.model as rm
from r1lab.errors import InputError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One small dense and one small MoE folder, each saved once and copied per case."""
    root = tmp_path_factory.mktemp("saved")
    dense = rm.save(rm.build(rm.preset("tiny-dense"), seed=0), root / "dense")
    moe = rm.save(rm.build(rm.preset("tiny-moe"), seed=0), root / "moe", max_shard_bytes=300_000)
    return {"dense": dense, "moe": moe}


def _copy(saved, tmp_path, kind="dense"):
    return shutil.copytree(saved[kind], tmp_path / kind)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            del cfg[key]
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


_DROP = object()


def _truncate(f, rnd):
    data = f.read_bytes()
    f.write_bytes(data[: rnd.randrange(16, len(data) - 1)])


def _empty(f, rnd):
    f.write_bytes(b"")


def _corrupt_header(f, rnd):
    data = bytearray(f.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = rnd.randrange(8, 8 + header_len - 8)
    data[start:start + 8] = b"\x00garbage"
    f.write_bytes(bytes(data))


def _not_safetensors(f, rnd):
    f.write_bytes(bytes(rnd.randrange(256) for _ in range(4096)))


def _weights_damaged(how):
    def damage(folder, rnd):
        how(folder / "model.safetensors", rnd)
        return "model.safetensors", "header"
    return damage


def _shard_damaged(folder, rnd):
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    victim = rnd.choice(shards)
    _truncate(victim, rnd)
    return victim.name, "header"


def _config(field, value):
    def damage(folder, rnd):
        _edit_config(folder, **{field: value})
        return "config.json", field
    return damage


def _tensor_dtype(folder, rnd):
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(state, folder / "model.safetensors")
    return "model.safetensors", "model.norm.weight"


def _index_damaged(folder, rnd):
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm')
    return "model.safetensors.index.json", "invalid JSON"


# (case id, folder kind, damage -> (file name, field) the message must name)
CASES = [
    ("truncated-weights", "dense", _weights_damaged(_truncate)),
    ("empty-weights", "dense", _weights_damaged(_empty)),
    ("corrupt-header", "dense", _weights_damaged(_corrupt_header)),
    ("not-safetensors", "dense", _weights_damaged(_not_safetensors)),
    ("truncated-shard", "moe", _shard_damaged),
    ("damaged-index", "moe", _index_damaged),
    ("layers-not-a-number", "dense", _config("num_hidden_layers", "four")),
    ("heads-zero", "dense", _config("num_attention_heads", 0)),
    ("hidden-size-float", "dense", _config("hidden_size", 64.5)),
    ("tied-not-bool", "dense", _config("tie_word_embeddings", "yes")),
    ("eps-negative", "dense", _config("rms_norm_eps", -1e-6)),
    ("rope-theta-text", "dense", _config("rope_theta", "1e6")),
    ("missing-hidden-size", "dense", _config("hidden_size", _DROP)),
    ("missing-vocab-size", "dense", _config("vocab_size", _DROP)),
    ("missing-kv-lora-rank", "moe", _config("kv_lora_rank", _DROP)),
    ("missing-n-routed-experts", "moe", _config("n_routed_experts", _DROP)),
    ("unknown-quant-method", "moe", _config("quantization_config", {"quant_method": "bitsandbytes_4bit"})),
    ("fp8-without-quantization-config", "dense", _tensor_dtype),
]


def _damaged(saved, tmp_path, kind, damage, seed):
    folder = _copy(saved, tmp_path, kind)
    fname, field = damage(folder, random.Random(seed))
    return folder, fname, field


@pytest.mark.parametrize("case,kind,damage", CASES, ids=[c[0] for c in CASES])
def test_load_names_file_and_field_in_one_line(saved, tmp_path, case, kind, damage):
    folder, fname, field = _damaged(saved, tmp_path, kind, damage, seed=len(case))
    with pytest.raises(InputError) as info:
        rm.load(folder)
    message = str(info.value)
    assert "\n" not in message, message
    assert fname in message and field in message, message


@pytest.mark.parametrize("case,kind,damage", [CASES[0], CASES[6], CASES[12]], ids=[CASES[i][0] for i in (0, 6, 12)])
def test_cli_prints_one_line_and_exits_2(saved, tmp_path, monkeypatch, capsys, case, kind, damage):
    from r1lab.cli import main

    folder, fname, field = _damaged(saved, tmp_path, kind, damage, seed=7)
    monkeypatch.delenv("R1LAB_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["r1lab", "info", str(folder)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert fname in err and field in err and "Traceback" not in err, err


def test_wrong_value_is_quoted(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, num_hidden_layers="four")
    with pytest.raises(rm.ConfigError, match=r"config.json: num_hidden_layers must be an integer >= 1, got 'four'"):
        rm.load(folder)


def test_every_missing_required_field_is_listed(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, hidden_size=_DROP, vocab_size=_DROP)
    with pytest.raises(rm.ConfigError, match="required field.* missing: vocab_size, hidden_size"):
        rm.load(folder)


def test_r1lab_folders_and_transformers_configs_carry_every_required_field(saved, tmp_path):
    """The required fields are exactly ones that r1lab's and transformers' own config.json always write."""
    from r1lab.model.config import REQUIRED_FIELDS

    transformers = pytest.importorskip("transformers")
    for kind, model_type in (("dense", "qwen2"), ("moe", "deepseek_v3")):
        cfg = json.loads((saved[kind] / "config.json").read_text())
        need = REQUIRED_FIELDS["*"] + REQUIRED_FIELDS.get(model_type, ())
        assert set(need) <= set(cfg), set(need) - set(cfg)
        assert rm.load(saved[kind]).args.model_type == model_type
    for name, model_type in (("LlamaConfig", "llama"), ("Qwen2Config", "qwen2"), ("MistralConfig", "mistral"),
                             ("DeepseekV3Config", "deepseek_v3")):
        getattr(transformers, name)().save_pretrained(tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        need = REQUIRED_FIELDS["*"] + REQUIRED_FIELDS.get(model_type, ())
        assert set(need) <= set(cfg), (name, set(need) - set(cfg))


# ----------------------------------------------------------------------------- GGUF sources
def _tiny_gguf(path):
    import numpy as np

    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((64, 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_gguf_is_one_line_naming_it(tmp_path, damage):
    from r1lab.model.gguf_import import import_gguf

    path = _tiny_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    rnd = random.Random(damage)
    path.write_bytes({"truncated": data[: rnd.randrange(len(data) // 2, len(data) - 64)],
                      "garbage": bytes(rnd.randrange(256) for _ in range(512)), "empty": b""}[damage])
    with pytest.raises(InputError) as info:
        import_gguf(str(path), tmp_path / "out")
    assert "\n" not in str(info.value) and "m.gguf" in str(info.value) and "GGUF" in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unknown_gguf_source_lists_the_known_ones(tmp_path):
    from r1lab.model.gguf_import import import_gguf

    with pytest.raises(InputError, match="unknown GGUF source 'qwen9'.*qwen2.5-coder-1.5b"):
        import_gguf("qwen9", tmp_path / "out")
