"""A self-contained HTML report of one run directory: training curves, before/after tables, eval items,
sample completions with their <think>/<answer> parts highlighted, and the "aha moment" analysis.

The report has no external resources: figures are inline base64 PNGs, CSS is inline, so the single file
can be mailed or opened offline. Every input is optional; a file that is missing is simply not reported,
and a line that is not valid JSON (a run killed mid-write) is skipped and noted in the report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

# Words that mark self-reflection in a chain of thought (R1's "aha moment": the model stops, re-checks,
# and changes course). English words are matched as whole words, case-insensitively.
REFLECTION_WORDS_EN = ("wait", "verify", "check", "recheck", "re-evaluate", "mistake", "however", "but",
                       "retry", "alternatively")
# Chinese has no spaces between words, so these are counted as substrings.
REFLECTION_WORDS_ZH = ("等等", "验证", "检查")

_EN_WORD = re.compile(r"[a-z0-9]+(?:['’-][a-z0-9]+)*")
_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# A think block may be opened by the prompt (R1 forces the response to start after "<think>\n"), so a
# leading "...</think>" counts as thinking too; an unclosed block runs to the end of a truncated output.
_TAG = re.compile(r"</?(?:think|answer)>")
_TAGGED = re.compile(r"(<think>.*?(?:</think>|$)|<answer>.*?(?:</answer>|$))", re.DOTALL)

MAX_SAMPLES_PER_STEP = 3
MAX_EVAL_ITEMS = 20
MAX_TEXT_CHARS = 4000

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.9em;display:block;overflow-x:auto;max-width:100%}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#1a7f37}.neg{color:#b42318}
pre.sample{white-space:pre-wrap;background:#fafafa;border:1px solid #ddd;padding:.6em;max-height:30em;overflow:auto}
.think{font-style:italic;color:#666;background:#eef1f6}
.answer{font-weight:bold;color:#1a7f37;background:#e9f7ec}
.warning{color:#9a6700;background:#fff8c5;padding:.4em}
.note{color:#555;font-size:.85em;margin-top:-.5em}
img{max-width:100%}
"""


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def reflection_word_frequency(texts: Iterable[str]) -> dict[str, float]:
    """Occurrences of each reflection word per 1000 words of ``texts``, plus their sum under "total".

    Words are English word tokens (letters/digits, inner hyphens and apostrophes kept, so "re-evaluate"
    is one word) plus each CJK character, because Chinese text has no word boundaries to count. English
    reflection words match whole tokens only ("check" does not count "recheck" or "checking").
    """
    counts = dict.fromkeys(REFLECTION_WORDS_EN + REFLECTION_WORDS_ZH, 0)
    n_words = 0
    for text in texts:
        text = _TAG.sub(" ", text)  # the tag names are markup, not words the model chose
        tokens = _EN_WORD.findall(text.lower())
        n_words += len(tokens) + len(_CJK_CHAR.findall(text))
        for token in tokens:
            if token in counts:
                counts[token] += 1
        for word in REFLECTION_WORDS_ZH:
            counts[word] += text.count(word)
    scale = 1000.0 / n_words if n_words else 0.0
    frequency = {word: count * scale for word, count in counts.items()}
    frequency["total"] = sum(frequency.values())
    return frequency


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """JSON objects of a .jsonl file and warnings for lines that could not be read (skipped, not fatal)."""
    records, warnings = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.append(f"{path.name} line {number} is not valid JSON (partly written?); skipped")
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            warnings.append(f"{path.name} line {number} is not a JSON object; skipped")
    return records, warnings


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value) -> str:
    if _is_number(value):
        if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e15):
            return str(int(value))
        return f"{value:.4g}"
    return html.escape(str(value))


def highlight_completion(text: str) -> str:
    """HTML of a completion, escaped, with think blocks dimmed and answer blocks bold green."""
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + " […truncated]"
    parts = []
    close = text.find("</think>")
    if close != -1 and "<think>" not in text[:close]:
        parts.append(f'<span class="think">{html.escape(text[:close + 8])}</span>')
        text = text[close + 8:]
    for piece in _TAGGED.split(text):
        if not piece:
            continue
        css = "think" if piece.startswith("<think>") else "answer" if piece.startswith("<answer>") else ""
        escaped = html.escape(piece)
        parts.append(f'<span class="{css}">{escaped}</span>' if css else escaped)
    return "".join(parts)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; header strings are escaped here, cells must already be HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _num_cell(value) -> str:
    return f'<td class="num">{_fmt(value)}</td>' if _is_number(value) else f"<td>{_fmt(value)}</td>"


# ---------------------------------------------------------------------------------------------------------
# Figures


METRIC_GROUPS = (  # (title, predicate on the metric name, all metrics on one axes?)
    ("Reward and accuracy", lambda k: k.startswith("reward") or "accuracy" in k or "format" in k
     or k.startswith(("pass@", "cons@")), True),
    ("Response length", lambda k: "length" in k, True),
    ("Loss, KL, entropy and optimizer", lambda k: any(s in k for s in ("loss", "kl", "entropy", "clip",
                                                                       "grad", "lr")), False),
    ("Throughput", lambda k: any(s in k for s in ("per_s", "/s", "throughput", "time", "sec")), False),
)


def group_metric_keys(keys: Iterable[str]) -> list[tuple[str, list[str], bool]]:
    """Assign each metric name to the first matching group of METRIC_GROUPS; the rest go to "Other"."""
    grouped: dict[str, list[str]] = {title: [] for title, _, _ in METRIC_GROUPS}
    other = []
    for key in keys:
        title = next((t for t, matches, _ in METRIC_GROUPS if matches(key.lower())), None)
        (grouped[title] if title else other).append(key)
    result = [(title, grouped[title], shared) for title, _, shared in METRIC_GROUPS if grouped[title]]
    return result + ([("Other", other, False)] if other else [])


def _png_img(fig, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


# Lines sharing one axes differ in dash and marker as well as colour, so that two curves that coincide over
# a stretch (training accuracy and the accuracy reward term, say) both stay visible.
LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "P"))


def merge_identical_series(series: dict[str, tuple[list[float], list[float]]]
                           ) -> dict[str, tuple[list[float], list[float]]]:
    """Series with exactly the same points drawn once, labelled with all their names ("a = b"): a second
    line drawn on top of an identical one would hide it."""
    merged: dict[tuple, list[str]] = {}
    for name, (xs, ys) in series.items():
        merged.setdefault((tuple(xs), tuple(ys)), []).append(name)
    return {" = ".join(names): (list(xs), list(ys)) for (xs, ys), names in merged.items()}


def plot_series(title: str, series: dict[str, tuple[list[float], list[float]]], shared_axes: bool,
                xlabel: str = "step") -> str:
    """An inline <img> with one line per series, on one axes (distinct styles, a legend beside it, identical
    series merged) or as small multiples."""
    # Figure + Agg canvas directly instead of pyplot: no global backend switch, no figure registry leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if shared_axes:
        series = merge_identical_series(series)
    n_axes = 1 if shared_axes else len(series)
    columns = min(3, n_axes)
    rows = math.ceil(n_axes / columns)
    fig = Figure(figsize=(4.2 * columns if n_axes > 1 else 9, 3.0 * rows if n_axes > 1 else 3.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for index, (name, (xs, ys)) in enumerate(series.items()):
        ax = axes[0 if shared_axes else index]
        if shared_axes:
            dash, marker = LINE_STYLES[index % len(LINE_STYLES)]
            ax.plot(xs, ys, linestyle=dash, marker=marker, markersize=4, markevery=max(1, len(xs) // 25),
                    linewidth=1.5, label=name)
        else:
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=name)
            ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if shared_axes:
        axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        axes[0].set_title(title)
    else:
        fig.suptitle(title)
    for ax in axes[len(series) if not shared_axes else 1:]:
        ax.set_visible(False)
    return _png_img(fig, title)


def metric_series(records: Sequence[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Every numeric metric as (steps, values), ordered by step; a record without "step" uses its index."""
    ordered = sorted(enumerate(records), key=lambda item: item[1].get("step", item[0])
                     if _is_number(item[1].get("step")) else item[0])
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in ordered:
        step = record["step"] if _is_number(record.get("step")) else index
        for key, value in record.items():
            if key != "step" and _is_number(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(value)
    return series


# ---------------------------------------------------------------------------------------------------------
# Sections (each returns HTML, or "" when its input is absent)


def training_curves_section(records: Sequence[dict]) -> str:
    series = metric_series(records)
    if not series:
        return ""
    figures = [f"<h3>{html.escape(title)}</h3>" + plot_series(title, {k: series[k] for k in keys}, shared)
               for title, keys, shared in group_metric_keys(series)]
    return "<h2>Training curves</h2>" + "".join(figures)


# What an evaluation was asked to do rather than what it measured: listed apart, without a delta.
SETTING_KEYS = frozenset({"n_questions", "k", "temperature", "top_p", "max_new_tokens", "seed", "template",
                          "force_think", "stop_strings", "world_size", "init", "examples"})
# Rates where a rise is a regression; every other metric not named in _HIGHER_IS_BETTER has no direction
# (a longer response is neither better nor worse), so its delta is not coloured.
_LOWER_IS_BETTER = frozenset({"mixed_language_rate", "truncated_rate"})
_HIGHER_IS_BETTER = frozenset({"format_rate", "mean_score", "answered_rate"})


def is_timing_key(key: str) -> bool:
    """Wall-clock time and throughput: they depend on the machine and its load, not on the model."""
    k = key.lower()
    return k.endswith(("seconds", "_per_second", "per_s", "/s")) or k.startswith("time")


def summary_key_kind(key: str) -> str:
    """"setting", "timing" or "metric" (a measured result of the model)."""
    return "setting" if key in SETTING_KEYS else "timing" if is_timing_key(key) else "metric"


def metric_direction(key: str) -> int:
    """+1 when a higher value is better, -1 when lower is, 0 when neither (the delta is shown uncoloured)."""
    k = key.lower()
    if k in _LOWER_IS_BETTER:
        return -1
    if k in _HIGHER_IS_BETTER or k.startswith(("pass@", "cons@", "reward")) or "accuracy" in k:
        return 1
    return 0


def _delta_cell(key: str, before, after) -> str:
    if not (_is_number(after) and _is_number(before)):
        return "<td></td>"
    delta = after - before
    better = metric_direction(key) * (delta > 0) - metric_direction(key) * (delta < 0)
    css = " pos" if better > 0 else " neg" if better < 0 else ""
    return f'<td class="num{css}">{"+" if delta > 0 else ""}{_fmt(delta)}</td>'


def _before_after(before: dict, after: dict) -> str:
    keys = list(before) + [k for k in after if k not in before]
    parts = []
    metrics = [k for k in keys if summary_key_kind(k) == "metric"]
    if metrics:
        rows = [[f"<td>{html.escape(str(k))}</td>", _num_cell(before.get(k, "")), _num_cell(after.get(k, "")),
                 _delta_cell(k, before.get(k), after.get(k))] for k in metrics]
        parts.append("<h3>Before and after</h3>" + _table(["metric", "before", "after", "delta"], rows)
                     + '<p class="note">delta: green where the change is an improvement, red where it is a '
                       "regression, plain where the metric has no better direction.</p>")
    for kind, title in (("setting", "Evaluation settings"), ("timing", "Evaluation time")):
        chosen = [k for k in keys if summary_key_kind(k) == kind]
        if chosen:
            rows = [[f"<td>{html.escape(str(k))}</td>", _num_cell(before.get(k, "")), _num_cell(after.get(k, ""))]
                    for k in chosen]
            parts.append(f"<h3>{title}</h3>" + _table([kind, "before", "after"], rows))
    return "".join(parts)


def _grid(title: str, label: str, runs: dict) -> str:
    """One row per stage or benchmark: their metrics in one table, their settings and times in another."""
    keys: list[str] = []
    for values in runs.values():
        keys += [k for k in (values if isinstance(values, dict) else {}) if k not in keys]
    parts = []
    for heading, chosen in ((title, [k for k in keys if summary_key_kind(k) == "metric"]),
                            (f"{title}: settings and time", [k for k in keys if summary_key_kind(k) != "metric"])):
        if not chosen:
            continue
        rows = [[f"<td>{html.escape(str(name))}</td>"]
                + [_num_cell(values.get(k, "")) if isinstance(values, dict) else "<td></td>" for k in chosen]
                for name, values in runs.items()]
        parts.append(f"<h3>{html.escape(heading)}</h3>" + _table([label, *map(str, chosen)], rows))
    return "".join(parts)


def _value_cell(value) -> str:
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return f'<td class="num">{" + ".join(_fmt(v) for v in value)}</td>'  # seconds_parts: one per invocation
    return _num_cell(value)


def summary_section(summary: dict) -> str:
    parts = []
    before, after = summary.get("before"), summary.get("after")
    if isinstance(before, dict) or isinstance(after, dict):
        parts.append(_before_after(before if isinstance(before, dict) else {},
                                   after if isinstance(after, dict) else {}))
    grids = {"stages": ("Stages", "stage"), "benchmarks": ("Benchmarks", "benchmark")}
    for key, (title, label) in grids.items():
        if isinstance(summary.get(key), dict) and summary[key]:
            parts.append(_grid(title, label, summary[key]))
    benchmarks = summary.get("benchmarks") if isinstance(summary.get("benchmarks"), dict) else {}
    scalars = {k: v for k, v in summary.items() if k not in ("before", "after", *grids)
               and not isinstance(v, dict) and (not isinstance(v, list) or k == "seconds_parts")
               and k.partition("/")[0] not in benchmarks}  # "<bench>/<metric>" repeats the benchmarks table
    if scalars:
        parts.append("<h3>Run</h3>" + _table(["key", "value"], [[f"<td>{html.escape(k)}</td>", _value_cell(v)]
                                                                 for k, v in scalars.items()]))
        if "seconds_parts" in scalars:
            parts.append('<p class="note">seconds: wall-clock time of the whole run; seconds_parts: of each '
                         "invocation (the first run and every --resume).</p>")
    return "<h2>Summary</h2>" + "".join(parts) if parts else ""


def eval_section(name: str, items: Sequence[dict]) -> str:
    """The first MAX_EVAL_ITEMS eval items: question, gold, samples correct, first completion."""
    if not items:
        return ""
    flags = [bool(f) for item in items for f in (item.get("correct") or [])]
    header = f"<h3>{html.escape(name)}: {len(items)} items"
    header += f", pass@1 {sum(flags) / len(flags):.3f} over all samples</h3>" if flags else "</h3>"
    rows = []
    for item in items[:MAX_EVAL_ITEMS]:
        correct = item.get("correct") or []
        completions = item.get("completions") or []
        first = highlight_completion(str(completions[0])) if completions else ""
        rows.append([html.escape(str(item.get("question", ""))[:MAX_TEXT_CHARS // 4]),
                     html.escape(str(item.get("gold", ""))),
                     f'<td class="num">{sum(map(bool, correct))}/{len(correct)}</td>',
                     f'<pre class="sample">{first}</pre>'])
    return header + _table(["question", "gold", "correct", "first completion"], rows)


def samples_section(samples: Sequence[dict]) -> str:
    """A few completions from the first and the last logged step."""
    steps = sorted({s["step"] for s in samples if _is_number(s.get("step"))})
    if not steps:
        return ""
    parts = ["<h2>Samples</h2>"]
    for step in dict.fromkeys((steps[0], steps[-1])):
        parts.append(f"<h3>Step {_fmt(step)}</h3>")
        for sample in [s for s in samples if s.get("step") == step][:MAX_SAMPLES_PER_STEP]:
            reward = sample.get("reward")
            reward_text = f" — reward {_fmt(reward)}" if reward is not None else ""
            prompt = str(sample.get("prompt", ""))[-MAX_TEXT_CHARS // 4:]  # the question sits at the end
            parts.append(f"<p><b>Prompt</b>{reward_text}</p><pre class=\"sample\">{html.escape(prompt)}</pre>"
                         f"<pre class=\"sample\">{highlight_completion(str(sample.get('completion', '')))}</pre>")
    return "".join(parts)


def reflection_series(samples: Sequence[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Reflection-word frequency (per 1000 words) of each step's completions, as series over steps."""
    by_step: dict[float, list[str]] = {}
    for sample in samples:
        if _is_number(sample.get("step")) and isinstance(sample.get("completion"), str):
            by_step.setdefault(sample["step"], []).append(sample["completion"])
    steps = sorted(by_step)
    per_step = [reflection_word_frequency(by_step[step]) for step in steps]
    return {word: (steps, [f[word] for f in per_step]) for word in (per_step[0] if per_step else {})}


def aha_section(samples: Sequence[dict]) -> str:
    series = reflection_series(samples)
    if not series:
        return ""
    words = [w for w in series if w != "total"]
    top = sorted(words, key=lambda w: -sum(series[w][1]))[:5]
    shown = {"total": series["total"], **{w: series[w] for w in top if sum(series[w][1]) > 0}}
    table_rows = [[html.escape(w), f'<td class="num">{series[w][1][0]:.2f}</td>',
                   f'<td class="num">{series[w][1][-1]:.2f}</td>'] for w in ["total", *words]]
    return ("<h2>Reflection words (\"aha moment\")</h2><p>Occurrences per 1000 words of the sampled "
            "completions at each logged step. R1-Zero's reflective behaviour shows up as a rise.</p>"
            + plot_series("Reflection words per 1000 words", shown, shared_axes=True)
            + _table(["word", "first step", "last step"], table_rows))


# ---------------------------------------------------------------------------------------------------------
# Assembly


def _warning_html(message: str) -> str:
    # An HTML comment must not contain "--"; the visible note is escaped like any other text.
    comment = message.replace("--", "- -")
    return f'<!-- warning: {comment} --><p class="warning">Warning: {html.escape(message)}</p>'


def _eval_files(run_dir: Path) -> list[Path]:
    files = sorted((run_dir / "eval").glob("*.jsonl")) if (run_dir / "eval").is_dir() else []
    return files + ([run_dir / "eval.jsonl"] if (run_dir / "eval.jsonl").is_file() else [])


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from whichever run files exist and return its path.

    Reads metrics.jsonl, summary.json, eval/*.jsonl or eval.jsonl, samples.jsonl and config.yaml.
    """
    run_dir = Path(run_dir)
    warnings: list[str] = []
    sections: list[str] = []

    def load_jsonl(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        records, problems = read_jsonl(path)
        warnings.extend(problems)
        return records

    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            sections.append(summary_section(summary) if isinstance(summary, dict) else "")
        except json.JSONDecodeError as error:
            warnings.append(f"summary.json is not valid JSON ({error}); skipped")
    sections.append(training_curves_section(load_jsonl(run_dir / "metrics.jsonl")))
    samples = load_jsonl(run_dir / "samples.jsonl")
    sections.append(aha_section(samples))
    sections.append(samples_section(samples))
    eval_parts = [eval_section(str(path.relative_to(run_dir)), load_jsonl(path)) for path in _eval_files(run_dir)]
    if any(eval_parts):
        sections.append("<h2>Evaluation items</h2>" + "".join(eval_parts))
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        config_text = html.escape(config_path.read_text(encoding="utf-8", errors="replace"))
        sections.append(f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{config_text}</pre></details>")

    body = "".join(_warning_html(w) for w in warnings) + "".join(s for s in sections if s)
    if not any(sections):
        body += "<p>No run files found (metrics.jsonl, summary.json, samples.jsonl, eval results).</p>"
    title = html.escape(f"r1lab report: {run_dir.resolve().name}")
    document = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
                f"<style>{CSS}</style></head><body><h1>{title}</h1>{body}</body></html>\n")
    out_path = run_dir / "report.html"
    out_path.write_text(document, encoding="utf-8")
    return out_path
