"""Tests of the self-contained HTML run report and the reflection-word counter."""

import json
import re

import pytest

import r1lab.eval.report as report
from r1lab.eval.report import (
    group_metric_keys,
    highlight_completion,
    merge_identical_series,
    plot_series,
    read_jsonl,
    reflection_word_frequency,
    summary_section,
    write_report,
)

MALICIOUS = "<script>alert('pwned')</script>"


def write_jsonl(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path):
    metrics = [{"step": s, "reward": 0.1 * s, "reward/accuracy": 0.05 * s, "reward/format": 0.9,
                "response_length": 50 + 10 * s, "kl": 0.01 * s, "entropy": 1.0 - 0.05 * s, "loss": 0.3,
                "grad_norm": 1.5, "tokens_per_s": 1234.0, "stage": "grpo"} for s in range(1, 6)]
    # The last line was cut off mid-write by a crash.
    write_jsonl(tmp_path / "metrics.jsonl", metrics, tail='{"step": 6, "reward": 0.')
    samples = [
        {"step": 1, "prompt": "User: 2+2? Assistant:", "completion": "<think>it is 4</think><answer>4</answer>",
         "reward": 1.0},
        {"step": 1, "prompt": "User: 3+3?", "completion": MALICIOUS, "reward": 0.0},
        {"step": 5, "prompt": "User: 5+5?", "completion": "<think>wait, let me check. 5+5 is 10</think>"
                                                         "<answer>10</answer>", "reward": 1.0},
    ]
    write_jsonl(tmp_path / "samples.jsonl", samples)
    summary = {"before": {"accuracy": 0.125, "format_rate": 0.5}, "after": {"accuracy": 0.6875, "format_rate": 0.9},
               "stages": {"cold_start": {"accuracy": 0.25}, "reasoning_rl": {"accuracy": 0.5},
                          "rejection_sft": {"accuracy": 0.5625}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (tmp_path / "eval").mkdir()
    write_jsonl(tmp_path / "eval" / "math500.jsonl", [
        {"question": "What is 1/2 + 1/4? <b>bold</b>", "gold": "3/4",
         "completions": ["<answer>3/4</answer>", "<answer>0.7</answer>"], "correct": [True, False]}])
    return tmp_path


@pytest.fixture
def report_html(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_has_inline_reward_curve(report_html):
    match = re.search(r'<img alt="Reward and accuracy" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report_html)
    assert match, "reward curve image missing"
    assert len(match.group(1)) > 1000  # a real PNG, not an empty placeholder
    assert report_html.count("data:image/png;base64,") >= 4  # reward, length, losses, throughput, aha


def test_report_shows_before_after_with_delta_and_stages_in_order(report_html):
    assert "0.125" in report_html and "0.6875" in report_html
    assert "+0.5625" in report_html  # accuracy delta 0.6875 - 0.125
    positions = [report_html.index(name) for name in ("cold_start", "reasoning_rl", "rejection_sft")]
    assert positions == sorted(positions)


def test_report_escapes_model_output(report_html):
    assert MALICIOUS not in report_html
    assert "<script" not in report_html.lower()
    assert "&lt;script&gt;" in report_html
    assert "<b>bold</b>" not in report_html  # eval questions are escaped too


def test_report_highlights_think_and_answer(report_html):
    assert '<span class="think">&lt;think&gt;wait, let me check.' in report_html
    assert '<span class="answer">&lt;answer&gt;10&lt;/answer&gt;</span>' in report_html


def test_report_has_no_external_resources(report_html):
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", report_html, re.IGNORECASE)
    assert "@import" not in report_html and "url(" not in report_html


def test_report_tolerates_truncated_last_line(report_html):
    assert "<!-- warning: metrics.jsonl line 6 is not valid JSON" in report_html


def test_report_lists_eval_items(report_html):
    assert "math500.jsonl" in report_html and "1/2" in report_html and ">3/4<" in report_html


def test_report_on_empty_dir_still_writes(tmp_path):
    html_text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "No run files found" in html_text and "<img" not in html_text


def test_read_jsonl_skips_bad_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n{"a": 2}\n{"a"', encoding="utf-8")
    records, warnings = read_jsonl(path)
    assert records == [{"a": 1}, {"a": 2}]
    assert len(warnings) == 2 and "line 3" in warnings[0] and "line 5" in warnings[1]


def test_reflection_word_frequency_hand_counted():
    # 20 words; reflection words: Wait, check, but, wait, re-evaluate -> 5 ("checking", "rechecked" don't count)
    text = ("Wait, I should check this but checking takes time. Hmm wait: re-evaluate the sum "
            "rechecked twice, so it is twelve")
    frequency = reflection_word_frequency([text])
    assert frequency["wait"] == pytest.approx(2 * 1000 / 20)
    assert frequency["check"] == pytest.approx(1000 / 20)
    assert frequency["re-evaluate"] == pytest.approx(1000 / 20)
    assert frequency["recheck"] == 0.0
    assert frequency["total"] == pytest.approx(5 * 1000 / 20)


def test_reflection_word_frequency_counts_chinese_and_pools_texts():
    # "等等我要验证" = 6 CJK characters (words) with 2 reflection terms; "but ok" = 2 words, 1 reflection
    frequency = reflection_word_frequency(["等等我要验证", "but ok"])
    assert frequency["等等"] == pytest.approx(1000 / 8)
    assert frequency["验证"] == pytest.approx(1000 / 8)
    assert frequency["but"] == pytest.approx(1000 / 8)
    assert frequency["total"] == pytest.approx(3000 / 8)
    assert reflection_word_frequency([])["total"] == 0.0


def test_reflection_word_frequency_ignores_think_and_answer_tags():
    # words: "wait", "4" -> 2; the tag names would make it 6 words if they were counted
    assert reflection_word_frequency(["<think>wait</think><answer>4</answer>"])["wait"] == pytest.approx(500.0)


def test_highlight_completion_handles_open_think_and_truncation():
    # R1 prompts end in "<think>\n", so the completion starts inside the think block.
    out = highlight_completion("x < y</think><answer>y")
    assert out == ('<span class="think">x &lt; y&lt;/think&gt;</span>'
                   '<span class="answer">&lt;answer&gt;y</span>')


def test_group_metric_keys():
    groups = {title: keys for title, keys, _ in group_metric_keys(
        ["reward", "accuracy", "response_length_max", "kl", "tokens_per_s", "mystery"])}
    assert groups == {"Reward and accuracy": ["reward", "accuracy"], "Response length": ["response_length_max"],
                      "Loss, KL, entropy and optimizer": ["kl"], "Throughput": ["tokens_per_s"],
                      "Other": ["mystery"]}


def _table_after(heading: str, html_text: str) -> str:
    match = re.search(rf"<h3>{re.escape(heading)}</h3>(<table>.*?</table>)", html_text)
    assert match, f"no table under {heading!r}"
    return match.group(1)


def _rows(table: str) -> dict[str, list[str]]:
    """First cell's text -> the other cells, HTML kept (their class says the colour)."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]:
        cells = re.findall(r"<td[^>]*>.*?</td>", row)
        rows[re.sub(r"<[^>]+>", "", cells[0])] = cells[1:]
    return rows


EVAL_SUMMARY = {  # what r1lab zero writes: evaluate's summary before and after RL
    "before": {"pass@1": 0.25, "response_length": 20.8, "mixed_language_rate": 0.005, "n_questions": 100, "k": 8,
               "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 160, "seconds": 75.2, "tokens_per_second": 10.5},
    "after": {"pass@1": 0.6, "response_length": 39.2, "mixed_language_rate": 0.119, "n_questions": 100, "k": 8,
              "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 160, "seconds": 6.1, "tokens_per_second": 328.6},
    "task": "chain_sum", "seconds": 141.3, "seconds_parts": [100.2, 41.1]}


def test_settings_and_timing_are_apart_from_the_metrics_and_have_no_delta():
    html_text = summary_section(EVAL_SUMMARY)
    metrics = _rows(_table_after("Before and after", html_text))
    assert list(metrics) == ["pass@1", "response_length", "mixed_language_rate"]
    settings = _rows(_table_after("Evaluation settings", html_text))
    assert list(settings) == ["n_questions", "k", "temperature", "top_p", "max_new_tokens"]
    timing = _rows(_table_after("Evaluation time", html_text))
    assert list(timing) == ["seconds", "tokens_per_second"]
    for cells in [*settings.values(), *timing.values()]:
        assert len(cells) == 2  # before, after: no delta column
    assert "-69.1" not in html_text and "pos" not in "".join(timing["seconds"] + timing["tokens_per_second"])
    assert "neg" not in "".join(timing["seconds"])


def test_deltas_are_coloured_by_which_way_is_better():
    metrics = _rows(_table_after("Before and after", summary_section(EVAL_SUMMARY)))
    assert metrics["pass@1"][2] == '<td class="num pos">+0.35</td>'
    assert metrics["mixed_language_rate"][2] == '<td class="num neg">+0.114</td>'  # more mixing is a regression
    assert metrics["response_length"][2] == '<td class="num">+18.4</td>'  # longer is neither


def test_run_table_shows_the_seconds_of_every_part():
    run = _rows(_table_after("Run", summary_section(EVAL_SUMMARY)))
    assert run["seconds"] == ['<td class="num">141.3</td>']
    assert run["seconds_parts"] == ['<td class="num">100.2 + 41.1</td>']


def test_benchmarks_of_r1lab_eval_are_a_table_with_their_settings_apart():
    summary = {"model": "m", "k": 4, "chain_sum/pass@1": 0.5, "chain_sum/n_questions": 3,
               "benchmarks": {"chain_sum": {"pass@1": 0.5, "format_rate": 1.0, "n_questions": 3, "k": 4,
                                            "seconds": 2.0}}}
    html_text = summary_section(summary)
    assert _rows(_table_after("Benchmarks", html_text)) == {
        "chain_sum": ['<td class="num">0.5</td>', '<td class="num">1</td>']}
    assert re.search(r"<th>benchmark</th><th>n_questions</th><th>k</th><th>seconds</th>",
                     _table_after("Benchmarks: settings and time", html_text))
    assert list(_rows(_table_after("Run", html_text))) == ["model", "k"]  # the flat copies are not repeated


def test_identical_series_are_drawn_once_with_both_names():
    merged = merge_identical_series({"reward": ([0, 1], [1.0, 1.5]), "reward/accuracy": ([0, 1], [0.25, 0.5]),
                                     "accuracy": ([0, 1], [0.25, 0.5]), "format_rate": ([0, 1], [0.25, 0.6])})
    assert merged == {"reward": ([0, 1], [1.0, 1.5]), "reward/accuracy = accuracy": ([0, 1], [0.25, 0.5]),
                      "format_rate": ([0, 1], [0.25, 0.6])}


def test_lines_on_one_axes_differ_in_style_and_have_a_legend(monkeypatch):
    figures = []
    monkeypatch.setattr(report, "_png_img", lambda fig, alt: figures.append(fig) or "")
    near = [0.25, 0.5, 0.52]  # accuracy and the accuracy reward term with partial credit: almost one line
    plot_series("Reward and accuracy", {"reward": ([0, 1, 2], [1.0, 1.5, 1.6]),
                                        "reward/accuracy": ([0, 1, 2], [0.26, 0.5, 0.53]),
                                        "accuracy": ([0, 1, 2], near)}, shared_axes=True)
    (ax,) = [a for a in figures[0].axes if a.get_visible()]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["reward", "reward/accuracy", "accuracy"]
    assert len({(str(line.get_linestyle()), line.get_marker()) for line in lines}) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["reward", "reward/accuracy", "accuracy"]
