"""`r1lab zero` on a tiny run, called in-process: a used --out is refused unless --resume, a resume adds to
summary.json's seconds and never logs a step twice, progress is plain flushed lines without a terminal and
live bars on one, and the final table has the README's rows."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import time

import pytest
from rich.console import Console

from r1lab.cli import main
from r1lab.config import load_config
from r1lab.pipeline.zero import ZeroConfig, _Progress, print_table, run_zero
from r1lab.run_dir import RunDir, read_jsonl

TINY = ["grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=24", "grpo.task.train_size=16",
        "grpo.task.test_size=4", "eval.k=2", "eval.max_new_tokens=24"]


def _cli(*args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `r1lab ARGS`; stdout is no terminal, as when it goes to a log file."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["r1lab", *args])
        for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "R1LAB_TRACEBACK"):  # rich and main() read them
            mp.delenv(var, raising=False)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
            main()
    return stop.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A finished 2-step run and what it printed."""
    run = tmp_path_factory.mktemp("zero") / "run"
    code, out, err = _cli("zero", "--out", str(run), "grpo.steps=2", *TINY)
    assert code == 0, err
    return run, out


@pytest.fixture
def copy_of(first_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(first_run[0], run, symlinks=True)
    return run


def _steps(path) -> list[int]:
    return [row["step"] for row in read_jsonl(path)]


def test_rerun_without_resume_is_refused_and_touches_nothing(copy_of):
    files = {name: (copy_of / name).read_bytes() for name in ("metrics.jsonl", "summary.json", "config.yaml")}
    code, out, err = _cli("zero", "--out", str(copy_of), "grpo.steps=2", *TINY)
    assert code == 2 and out == ""
    assert err == (f"error: --out {copy_of} already holds a run (metrics.jsonl, summary.json, checkpoints/); "
                   f"continue it with `r1lab zero --out {copy_of} --resume`, or pick another --out\n")
    assert {name: (copy_of / name).read_bytes() for name in files} == files


def test_resume_adds_its_seconds_and_logs_each_step_once(first_run, copy_of):
    first = json.loads((copy_of / "summary.json").read_text())
    code, out, err = _cli("zero", "--out", str(copy_of), "--resume", "grpo.steps=3", *TINY)
    assert code == 0, err
    summary = json.loads((copy_of / "summary.json").read_text())
    assert _steps(copy_of / "metrics.jsonl") == [0, 1, 2]
    assert summary["before"] == first["before"]  # not evaluated again
    assert "before: from summary.json" in out
    parts = summary["seconds_parts"]
    assert len(parts) == 2 and parts[0] == first["seconds"] and parts[1] > 0
    assert summary["seconds"] == round(sum(parts), 1)


def test_resume_without_a_checkpoint_starts_over_without_logging_steps_twice(first_run, copy_of):
    shutil.rmtree(copy_of / "checkpoints")  # as if killed before its first checkpoint
    code, out, err = _cli("zero", "--out", str(copy_of), "--resume", "grpo.steps=2", *TINY)
    assert code == 0, err
    assert _steps(copy_of / "metrics.jsonl") == [0, 1]
    assert f"--resume: no checkpoint in {copy_of}; GRPO starts over at step 0" in out
    logged = _steps(first_run[0] / "samples.jsonl")
    assert logged and _steps(copy_of / "samples.jsonl") == logged  # one run's samples, not two runs' in a row


def test_without_a_terminal_progress_is_plain_lines_in_order(first_run):
    out = first_run[1]
    assert "\x1b[" not in out  # no live-bar control codes in a log file
    expected = ["eval before: the base model, before RL, 4 held-out questions x 2 samples", "eval before: pass@1 ",
                "GRPO step 1/2  reward ", "GRPO step 2/2  reward ", "eval after: the trained policy, after RL",
                "eval after: pass@1 ", "R1-Zero on chain_sum"]
    positions = [out.find(text) for text in expected]
    assert -1 not in positions and positions == sorted(positions), out
    assert re.search(r"mixed_language_rate\s*│\s*\d\.\d{3}\s*│\s*\d\.\d{3}\s*│\s*[+-]\d\.\d{3}", out), out


def test_on_a_terminal_the_evaluations_and_grpo_show_live_bars(tmp_path):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    cfg = load_config(ZeroConfig, None, ["grpo.steps=2", *TINY])
    with RunDir(tmp_path / "run") as run_dir:
        run_zero(cfg, run_dir, console=console)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())
    assert buffer.getvalue() != out  # a live display, drawn with control codes
    assert re.search(r"eval before .*4/4", out) and re.search(r"eval after .*4/4", out), out
    assert re.search(r"GRPO .*2/2 .*reward", out), out
    assert "GRPO step" not in out and "sampling," not in out  # the plain lines are for files


def test_plain_grpo_lines_are_throttled_but_show_the_first_and_last_step():
    buffer = io.StringIO()
    show = _Progress(Console(file=buffer, width=200), every_s=3600)
    assert not show.live
    for step in range(5):
        show.grpo_step(step, 5, {"reward": 0.5, "accuracy": 0.25})
    assert [line.split("  ")[0] for line in buffer.getvalue().splitlines()] == ["GRPO step 1/5", "GRPO step 5/5"]


def test_plain_evaluation_prints_a_line_every_few_seconds_meanwhile():
    buffer = io.StringIO()
    show = _Progress(Console(file=buffer, width=200), every_s=0.02)
    with show.evaluation("before", "the base model", 3, 2) as bar_arguments:
        time.sleep(0.3)
    assert bar_arguments == {}  # no live bar into a file
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "eval before: the base model, 3 held-out questions x 2 samples"
    assert len(lines) >= 2 and all(re.fullmatch(r"eval before: sampling, \d+ s", line) for line in lines[1:])
    count = len(lines)
    time.sleep(0.1)
    assert len(buffer.getvalue().splitlines()) == count  # the heartbeat ends with the evaluation


def test_table_has_the_mixed_language_row_when_both_sides_have_it():
    def table(before, after):
        buffer = io.StringIO()
        print_table({"task": "t", "before": before, "after": after}, console=Console(file=buffer, width=100))
        return buffer.getvalue()

    shown = table({"pass@1": 0.25, "mixed_language_rate": 0.005}, {"pass@1": 0.6, "mixed_language_rate": 0.119})
    assert re.search(r"mixed_language_rate\s*│\s*0\.005\s*│\s*0\.119\s*│\s*\+0\.114", shown), shown
    assert "mixed_language_rate" not in table({"pass@1": 0.25}, {"pass@1": 0.6})
