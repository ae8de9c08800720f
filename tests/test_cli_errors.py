"""The `r1lab` command on bad input: the message alone on stderr and exit status 2; other errors keep their
traceback."""

import sys

import pytest

from r1lab.cli import main
from r1lab.config import ConfigError
from r1lab.model import ASSETS_DIR as ASSETS


def _run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["r1lab", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["zero", "grpo.lrr=1"], "error: unknown key 'grpo.lrr' in override 'grpo.lrr=1'; did you mean 'grpo.lr'?"),
    (["zero", "grpo.group_size=1"], "error: grpo in override 'grpo.group_size=1': group_size must be >= 2, got 1"),
    (["pipeline", "r1", "final_rl.rewards.accuracy=x"],
     "error: final_rl in override 'final_rl.rewards.accuracy=x': reward 'accuracy': weight must be a number"),
    (["pipeline", "nosuch"], "error: unknown pipeline 'nosuch'; expected one of ['r1', 'zero']"),
    (["eval", "/no/such/model", "--bench", "chain_sum@3"], "error: model folder /no/such/model does not exist"),
])
def test_bad_input_prints_the_message_and_exits_2(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.delenv("R1LAB_TRACEBACK", raising=False)
    code, err = _run(monkeypatch, capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.startswith(message), err
    assert "Traceback" not in err


def test_a_bad_data_file_names_its_line(monkeypatch, capsys, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "1+1", "completion": "2"}\n{"prompt": "2+2", "completion":\n')
    code, err = _run(monkeypatch, capsys, "sft", f"model={ASSETS / 'r1-tiny'}", f"data={data}",
                     "--out", str(tmp_path / "run"))
    assert (code, err.strip()) == (2, f"error: {data}:2: invalid JSON (Expecting value)")


def test_traceback_on_request_and_for_other_errors(monkeypatch, capsys):
    monkeypatch.setenv("R1LAB_TRACEBACK", "1")
    monkeypatch.setattr(sys, "argv", ["r1lab", "zero", "grpo.lrr=1"])
    with pytest.raises(ConfigError, match="grpo.lrr"):
        main()

    import r1lab.model as rm

    def broken(name):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.delenv("R1LAB_TRACEBACK")
    monkeypatch.setattr(rm, "preset", broken)
    monkeypatch.setattr(sys, "argv", ["r1lab", "info", "tiny-dense"])
    with pytest.raises(RuntimeError, match="a bug"):
        main()
