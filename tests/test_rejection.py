"""Rejection sampling: every filter on synthetic completions, selection order and stats, and end to end."""

import json

import pytest

import r1lab.model as rm
import r1lab.rollout
from r1lab.tasks.corpus import pretrain_texts
from r1lab.pipeline.rejection import (
    REJECTION_REASONS,
    Candidate,
    FilterConfig,
    RejectionConfig,
    failed_filters,
    filter_records,
    has_bad_format,
    has_code_block,
    has_long_paragraph,
    has_mixed_language,
    normalize_for_dedup,
    paragraphs,
    rejection_sample,
    run_rejection,
    select,
    write_jsonl,
)
from r1lab.rollout import Completion
from r1lab.tasks import Problem
from r1lab.tokenizer import train_bpe
from r1lab.run_dir import read_jsonl


GOOD = "<think> Start with 2. Add 3: 2 + 3 = 5. So the answer is 5. </think> <answer> 5 </answer>"
MIXED = "<think> Start with 2. 加上 3：2 + 3 = 5。所以答案是 5。 </think> <answer> 5 </answer>"
CODE = "<think> Start with 2.\n```python\nprint(2 + 3)\n```\nSo the answer is 5. </think> <answer> 5 </answer>"
LONG = "<think> " + "Add one more and keep counting. " * 80 + "</think> <answer> 5 </answer>"
BAD_FORMAT = "Start with 2. Add 3. The answer is 5."
WRONG = "<think> Start with 2. Add 3: 2 + 3 = 6. So the answer is 6. </think> <answer> 6 </answer>"


def test_filters_on_synthetic_completions():
    assert not has_mixed_language(GOOD) and has_mixed_language(MIXED)
    assert has_mixed_language(GOOD, language="zh") and not has_mixed_language(MIXED, threshold=0.3)
    assert has_code_block(CODE) and not has_code_block(GOOD)
    assert has_long_paragraph(LONG, max_chars=1000) and not has_long_paragraph(GOOD, max_chars=1000)
    split = LONG.replace("counting. ", "counting.\n\n")
    assert not has_long_paragraph(split, max_chars=1000)  # many short paragraphs are fine
    assert has_long_paragraph(GOOD, max_tokens=5, count_tokens=lambda t: len(t.split()))
    with pytest.raises(ValueError, match="tokenizer"):
        has_long_paragraph(GOOD, max_tokens=5)
    assert paragraphs("a\n\n  \n b \n\nc") == ["a", "b", "c"]
    assert has_bad_format(BAD_FORMAT) and not has_bad_format(GOOD)
    assert normalize_for_dedup("  The  ANSWER\nis 5 ") == normalize_for_dedup("the answer is 5")
    cfg = FilterConfig(max_paragraph_chars=1000)
    assert failed_filters(GOOD, cfg) == []
    assert failed_filters(MIXED, cfg) == ["language"]
    assert failed_filters(CODE, cfg) == ["code_block"]
    assert failed_filters(LONG, cfg) == ["long_paragraph"]
    assert failed_filters(BAD_FORMAT, cfg) == ["format"]
    relaxed = FilterConfig(require_format=False, reject_code_blocks=False, max_paragraph_chars=None, language_threshold=0)
    assert all(failed_filters(t, relaxed) == [] for t in (MIXED, CODE, LONG, BAD_FORMAT))


def test_select_order_stats_dedup_and_cap():
    cands = [
        Candidate(0, 0, GOOD, 1.0),
        Candidate(0, 1, "  " + GOOD.upper().lower() + " ", 1.0),  # same text after normalization
        Candidate(0, 2, GOOD.replace("Start", "Begin"), 1.0),  # distinct: the second kept of prompt 0
        Candidate(0, 3, GOOD.replace("Start", "First"), 1.0),  # third distinct one: over the cap
        Candidate(1, 0, WRONG, 0.0),
        Candidate(1, 1, MIXED, 1.0),
        Candidate(1, 2, CODE, 1.0),
        Candidate(1, 3, LONG, 1.0),
        Candidate(2, 0, BAD_FORMAT, 1.0),
        Candidate(2, 1, GOOD, 1.0, finished=False),
        Candidate(2, 2, MIXED, 0.0),  # incorrect is checked before language
    ]
    kept, rejected = select(cands, FilterConfig(max_paragraph_chars=1000, max_per_prompt=2))
    assert [(c.prompt_index, c.sample_index) for c in kept] == [(0, 0), (0, 2)]
    reasons = {(c.prompt_index, c.sample_index): r for c, r in rejected}
    assert reasons == {(0, 1): "duplicate", (0, 3): "over_cap", (1, 0): "incorrect", (1, 1): "language",
                       (1, 2): "code_block", (1, 3): "long_paragraph", (2, 0): "format", (2, 1): "truncated",
                       (2, 2): "incorrect"}
    _, stats = filter_records([{"prompt": "p", "completion": t} for t in (GOOD, GOOD, MIXED)], FilterConfig(max_per_prompt=5))
    assert stats["kept"] == 1 and stats["rejected_duplicate"] == 1 and stats["rejected_language"] == 1


@pytest.fixture(scope="module")
def tok():
    return train_bpe(pretrain_texts(n_docs=200, n_cold_start=50), vocab_size=400)


def test_scripted_generation_goes_through_every_check(tok, monkeypatch, tmp_path):
    """A scripted engine returns chosen texts; the real accuracy reward and filters decide."""
    problems = [Problem("2 + 3 =", "5"), Problem("1 + 1 =", "2")]
    script = {0: [GOOD, GOOD, MIXED, WRONG], 1: [CODE.replace("5", "2"), "<answer> 2 </answer>", GOOD.replace("5", "2"),
                                                              GOOD.replace("5", "2")]}

    def fake_generate(model, prompts, params):
        assert params.n == 4 and params.stop_token_ids == tok.stop_ids
        out = []
        for p in range(len(prompts)):
            for j, text in enumerate(script[p]):
                ids = tok.encode(" " + text) + [tok.eos_id]
                out.append(Completion(p, j, ids, [0.0] * len(ids), "stop"))
        return out

    monkeypatch.setattr(r1lab.rollout, "generate", fake_generate)
    model = rm.build(rm.preset("tiny-dense", vocab_size=tok.vocab_size))
    result = rejection_sample(model, tok, problems, k=4, max_new_tokens=64, model_name="dev2", step=1200,
                              filters=FilterConfig(max_per_prompt=2))
    assert [r["completion"] for r in result.records] == [GOOD, GOOD.replace("5", "2")]
    rec = result.records[0]
    assert rec["prompt"].endswith("User: 2 + 3 =. Assistant:") and rec["question"] == "2 + 3 =" and rec["gold"] == "5"
    assert rec["source"]["model"] == "dev2" and rec["source"]["step"] == 1200 and rec["source"]["sample_index"] == 0
    assert "language" in rec["filters_passed"] and "correct" in rec["filters_passed"]
    s = result.stats
    assert (s["samples"], s["kept"], s["prompts_with_kept"]) == (8, 2, 2)
    assert (s["rejected_duplicate"], s["rejected_language"], s["rejected_incorrect"], s["rejected_code_block"],
            s["rejected_format"]) == (2, 1, 1, 1, 1)
    assert sum(s[f"rejected_{r}"] for r in REJECTION_REASONS) + s["kept"] == s["samples"]
    path = write_jsonl(result.records, tmp_path / "records.jsonl")
    assert read_jsonl(path) == result.records


def test_end_to_end_with_a_tiny_model(tok, tmp_path):
    """Real sampling from a random tiny model with a scripted scorer: plumbing, caps, provenance, determinism."""
    model = rm.build(rm.preset("tiny-dense", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    problems = [{"question": f"{a} + {a} =", "gold": str(2 * a)} for a in range(3)]
    relaxed = FilterConfig(require_format=False, language_threshold=0.0, max_paragraph_chars=None,
                           reject_code_blocks=False, reject_truncated=False, max_per_prompt=2)

    def even_length(problem, completion):  # records hold the completion without its leading whitespace
        return float(len(completion.lstrip()) % 2 == 0)

    def run():
        return rejection_sample(model, tok, problems, k=4, temperature=1.0, max_new_tokens=12, scorer=even_length,
                                filters=relaxed, seed=5, step=7)

    result = run()
    s = result.stats
    assert s["samples"] == 12 and s["kept"] + s["rejected_incorrect"] + s["rejected_duplicate"] + s["rejected_over_cap"] == 12
    assert all(len(r["completion"]) % 2 == 0 for r in result.records)
    per_prompt = [sum(r["question"] == p["question"] for r in result.records) for p in problems]
    assert max(per_prompt) <= 2
    assert all(r["source"]["step"] == 7 and r["source"]["model"] == "qwen2" for r in result.records)
    assert run().records == result.records  # seeded
    assert model.training  # the caller's train/eval mode is restored


def test_run_rejection_command(tok, tmp_path):
    model = rm.build(rm.preset("tiny-dense", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    rm.save(model, tmp_path / "m")
    tok.save(tmp_path / "m")
    cfg = RejectionConfig(model=str(tmp_path / "m"), size=3, k=2, max_new_tokens=8,
                          filters=FilterConfig(min_score=0.0, require_format=False, language_threshold=0.0,
                                               reject_truncated=False, max_per_prompt=2))
    path = run_rejection(cfg, tmp_path / "run", log=lambda s: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"] == 6 and len(read_jsonl(path)) == summary["kept"]
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "rejected.jsonl").is_file()


def test_sampling_spec_poses_its_instruction_and_passes_its_stop_strings(monkeypatch):
    spec = RejectionConfig(task="chain_sum", size=3, instruction="Answer in <answer> tags.", stop_strings=["</answer>"])
    task = spec.load_task(seed=0)
    assert len(task) == 3 and task.instruction == "Answer in <answer> tags."
    assert RejectionConfig(task="chain_sum", size=3).load_task(seed=0).instruction != task.instruction
    seen = {}
    monkeypatch.setattr("r1lab.pipeline.rejection.rejection_sample", lambda *a, **kw: seen.update(kw))
    spec.sample(None, None, task, seed=4, model_name="m")
    assert seen["stop_strings"] == ["</answer>"] and seen["seed"] == 4 and seen["k"] == spec.k
