"""Recipes + dotted overrides → nested dataclasses, with clear errors."""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from r1lab.config import ConfigError, load_config, parse_value, to_dict
from r1lab.train.grpo_math import Objective
from r1lab.run_dir import RunDir


@dataclass
class Optim:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0


@dataclass
class Rollout:
    group_size: int = 8
    temperature: float = 1.0
    stop: list[str] = field(default_factory=list)
    engine: Literal["hf", "r1lab"] = "r1lab"


@dataclass
class Train:
    name: str = "run"
    seed: int = 0
    out: Path | None = None
    max_steps: int | None = None
    optim: Optim = field(default_factory=Optim)
    rollout: Rollout = field(default_factory=lambda: Rollout(group_size=16))  # differs from class default
    objective: Objective = field(default_factory=Objective)
    weights: dict[str, float] = field(default_factory=dict)
    model: dict = field(default_factory=lambda: {"hidden": 64, "layers": 2, "rope": {"theta": 1e4}})


@dataclass
class Required:
    model: str
    steps: int = 1


@pytest.mark.parametrize(
    "text, value",
    [("3", 3), ("-7", -7), ("1e-6", 1e-6), ("1E+5", 1e5), ("-2e3", -2000.0), ("1.5", 1.5), (".5", 0.5),
     ("1.0e-6", 1e-6), ("true", True), ("false", False), ("null", None), ("[1, 2]", [1, 2]),
     ("{a: 1e-3}", {"a": 1e-3}), ("abc", "abc"), ("a: b: c", "a: b: c"), ("'3'", "3")],
)
def test_parse_value(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_defaults_file_and_overrides(tmp_path):
    assert load_config(Train) == Train()
    recipe = tmp_path / "zero.yaml"
    recipe.write_text(
        "name: zero\n"
        "optim:\n  lr: 1e-6       # YAML 1.1 would read this as a string\n  warmup_steps: 20\n"
        "rollout:\n  temperature: 0.7\n  stop: ['</answer>']\n"
        "objective:\n  clip_low: 10\n  beta: 0.001\n"
        "weights: {accuracy: 1, format: 0.5}\n"
    )
    cfg = load_config(Train, recipe, ["optim.lr=3e-6", "seed=3", "name=007", "out=/tmp/r", "rollout.engine=hf",
                                      "optim.betas=[0.9, 0.99]", "max_steps=null", "objective.aggregation=token_mean"])
    assert cfg.optim == Optim(lr=3e-6, betas=(0.9, 0.99), warmup_steps=20)
    assert isinstance(cfg.optim.lr, float)
    # a partial section keeps the default_factory's values (group_size 16, not the class's 8)
    assert cfg.rollout == Rollout(group_size=16, temperature=0.7, stop=["</answer>"], engine="hf")
    assert cfg.name == "007" and cfg.seed == 3 and cfg.out == Path("/tmp/r") and cfg.max_steps is None
    assert cfg.objective.clip_low == 10.0 and isinstance(cfg.objective.clip_low, float)
    assert cfg.objective.aggregation == "token_mean" and cfg.objective.beta == 0.001
    assert cfg.weights == {"accuracy": 1.0, "format": 0.5}
    # later overrides win; a section given as a mapping on the command line
    cfg = load_config(Train, recipe, ["optim={lr: 1e-4}", "optim.warmup_steps=5"])
    assert cfg.optim == Optim(lr=1e-4, warmup_steps=5)


def test_dict_fields_merge_over_their_default():
    cfg = load_config(Train, None, ["model.hidden=128", "model.rope.factor=2", "weights.acc=1"])
    assert cfg.model == {"hidden": 128, "layers": 2, "rope": {"theta": 1e4, "factor": 2}}
    assert type(cfg.model["rope"]) is dict and cfg.weights == {"acc": 1.0}


def test_round_trip_through_config_yaml(tmp_path):
    cfg = load_config(Train, None, ["optim.lr=2e-6", "rollout.stop=[a, b]", "out=/x", "weights={acc: 2}"])
    path = RunDir(tmp_path).write_config(cfg)
    assert load_config(Train, path) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.95] and to_dict(cfg)["out"] == "/x"


def test_unknown_keys_name_path_source_and_suggest(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lrr: 1e-6\n")
    with pytest.raises(ConfigError) as e:
        load_config(Train, recipe)
    msg = str(e.value)
    assert "'optim.lrr'" in msg and str(recipe) in msg and "did you mean 'optim.lr'" in msg
    assert "lr, betas, warmup_steps" in msg
    with pytest.raises(ConfigError, match=r"unknown key 'rollout.group_sise' in override 'rollout.group_sise=4'.*"):
        load_config(Train, None, ["rollout.group_sise=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer' in override 'optimizer.lr=1'.*mean 'optim'"):
        load_config(Train, None, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"seed: expected int, got \{'x': 1\} \(dict\) in override 'seed.x=1'"):
        load_config(Train, None, ["seed.x=1"])
    with pytest.raises(ConfigError, match="override 'seed.x=1': seed is a value, not a section"):
        load_config(Train, None, ["seed=1", "seed.x=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(Train, None, ["seed"])


def test_type_errors_name_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.group_size: expected int, got 'abc'.*override"):
        load_config(Train, None, ["rollout.group_size=abc"])
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got True"):
        load_config(Train, None, ["optim.lr=true"])
    with pytest.raises(ConfigError, match=r"rollout.engine: 'vllm' .* not one of 'hf', 'r1lab'"):
        load_config(Train, None, ["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match=r"optim.betas: expected tuple\[float, float\].*2 items"):
        load_config(Train, None, ["optim.betas=[1, 2, 3]"])
    with pytest.raises(ConfigError, match=r"rollout.stop\[1\]: expected str"):
        load_config(Train, None, ["rollout.stop=[a, 3]"])
    recipe = tmp_path / "t.yaml"
    recipe.write_text("name: 12\n")
    with pytest.raises(ConfigError, match=rf"name: expected str, got 12 \(int\) in {recipe}.*quote"):
        load_config(Train, recipe)
    recipe.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match=r"optim: expected Optim.*section"):
        load_config(Train, recipe)
    assert load_config(Train, None, ["rollout.group_size=1e3"]).rollout.group_size == 1000
    with pytest.raises(ConfigError, match="group_size: expected int, got 2.5"):
        load_config(Train, None, ["rollout.group_size=2.5"])


def test_file_errors_and_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Train, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: invalid YAML"):
        load_config(Train, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Train, bad)
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config(Required)
    assert load_config(Required, None, ["model=tiny"]) == Required(model="tiny")


@dataclass
class Ranged:
    k: int = 4
    top_p: float = 0.9
    lr: float = 1e-3
    sub: Rollout = field(default_factory=Rollout)

    def __post_init__(self) -> None:
        from r1lab.config import check_ranges

        check_ranges(self, at_least={"k": 1}, positive=("lr",), unit=("top_p",))


@pytest.mark.parametrize("bad,message", [
    ("k=0", "k must be >= 1, got 0"), ("lr=0", "lr must be > 0, got 0.0"), ("lr=-1e-3", "lr must be > 0"),
    ("top_p=0", r"top_p must be in \(0, 1\], got 0"), ("top_p=1.5", r"top_p must be in \(0, 1\]"),
])
def test_range_errors_name_the_field_and_where_its_value_came_from(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=rf"^Ranged in override '{re.escape(bad)}': {message}"):
        load_config(Ranged, None, ["sub.group_size=4", bad])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(bad.replace("=", ": ") + "\n")
    with pytest.raises(ConfigError, match=rf"^Ranged in {re.escape(str(recipe))}: {message}"):
        load_config(Ranged, recipe, ["sub.group_size=4"])
    assert load_config(Ranged, None, ["k=1", "top_p=1", "lr=1e-9"]) == Ranged(k=1, top_p=1.0, lr=1e-9)


def test_r1lab_configs_reject_out_of_range_values_when_loaded():
    from r1lab.pipeline.r1 import PipelineConfig

    with pytest.raises(ConfigError, match=r"^final_rl in override 'final_rl.group_size=1': group_size must be >= 2"):
        load_config(PipelineConfig, None, ["final_rl.group_size=1"])
    with pytest.raises(ConfigError, match=r"^eval in override 'eval.k=0': k must be >= 1, got 0"):
        load_config(PipelineConfig, None, ["eval.k=0"])
    with pytest.raises(ConfigError, match=r"^zero in override 'zero.top_p=2': top_p must be in \(0, 1\]"):
        load_config(PipelineConfig, None, ["zero.top_p=2"])
    with pytest.raises(ConfigError, match=r"^zero.objective in .*: clip_high must be > 0 or null, got -0.1"):
        load_config(PipelineConfig, None, ["zero.objective.clip_high=-0.1"])
    with pytest.raises(ConfigError, match=r"^task in override 'task.train_size=0': train_size must be >= 1"):
        load_config(PipelineConfig, None, ["task.train_size=0"])
