"""Tests for r1lab.tasks.corpus: reasoning-gym parity, determinism, mixture shares, correctness of reasoning."""

from __future__ import annotations

import random
import re

import pytest

from r1lab.tasks.corpus import (
    CHAIN_SUM_QUESTION_RE,
    ChainProblem,
    CorpusConfig,
    answer_text,
    classify_document,
    corpus_stats,
    find_equations,
    generate_cold_start,
    generate_corpus,
    has_cjk,
    is_well_formatted,
    pretrain_texts,
    r1_zero_prompt,
    sample_problem,
    split_document,
    think_text,
)

N_DOCS = 4000
CFG = CorpusConfig()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return generate_corpus(CFG, n_docs=N_DOCS, seed=0)


@pytest.fixture(scope="module")
def kinds(docs: list[str]) -> list[str]:
    return [classify_document(d) for d in docs]


def _docs_of(docs: list[str], kinds: list[str], *wanted: str) -> list[str]:
    return [d for d, k in zip(docs, kinds) if k in wanted]


@pytest.mark.parametrize("allow_negation", [False, True])
def test_questions_match_reasoning_gym(allow_negation: bool) -> None:
    reasoning_gym = pytest.importorskip("reasoning_gym")
    ranges = dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2)
    dataset = reasoning_gym.create_dataset("chain_sum", size=50, seed=1, allow_negation=allow_negation, **ranges)
    for idx, item in enumerate(dataset):
        parsed = ChainProblem.from_question(item["question"])
        assert parsed.question == item["question"]
        assert str(parsed.answer) == item["answer"]
        # same distribution, down to the RNG calls: reasoning-gym seeds item idx with seed + idx
        drawn = sample_problem(random.Random(1 + idx), allow_negation=allow_negation, **ranges)
        assert drawn == parsed


def test_determinism_by_seed(docs: list[str]) -> None:
    assert generate_corpus(CFG, n_docs=N_DOCS, seed=0) == docs
    assert generate_corpus(CFG, n_docs=200, seed=1) != docs[:200]
    assert generate_cold_start(20, seed=3) == generate_cold_start(20, seed=3)
    assert generate_cold_start(20, seed=3) != generate_cold_start(20, seed=4)


def test_realized_shares_match_config(docs: list[str]) -> None:
    stats = corpus_stats(docs)
    tolerance = 1.0 / N_DOCS  # top-level kinds are allocated exactly
    assert stats["n_docs"] == N_DOCS
    assert abs(stats["careful"] - CFG.p_careful) <= tolerance
    assert abs(stats["lazy"] - CFG.p_lazy) <= tolerance
    assert abs(stats["bad_format"] - CFG.p_bad_format) <= tolerance
    assert abs(stats["plain"] - CFG.p_plain) <= tolerance
    assert abs(stats["chinese_mix"] - CFG.p_chinese_mix) <= 0.01
    assert abs(stats["chinese_full"] - CFG.p_chinese_full) <= 0.01
    # per-document coin flips: binomial noise on a few hundred documents
    assert abs(stats["detailed"] - CFG.p_detailed) <= 0.07
    assert abs(stats["check"] - CFG.p_check) <= 0.04
    assert abs(stats["self_correct"] - CFG.p_self_correct) <= 0.03
    assert abs(stats["lazy_correct"] - CFG.lazy_correct_prob) <= 0.04
    assert abs(stats["plain_chinese"] - CFG.p_plain_chinese) <= 0.1


def test_other_mixtures_are_realized() -> None:
    cfg = CorpusConfig(p_careful=0.6, p_lazy=0.2, p_bad_format=0.15, p_plain=0.05, p_chinese_mix=0.3, p_chinese_full=0.0)
    stats = corpus_stats(generate_corpus(cfg, n_docs=1000, seed=2))
    for key in ("careful", "lazy", "bad_format", "plain"):
        assert abs(stats[key] - getattr(cfg, f"p_{key}")) <= 0.001
    assert abs(stats["chinese_mix"] - 0.3) <= 0.01 and stats["chinese_full"] == 0.0


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be 1"):
        generate_corpus(CorpusConfig(p_careful=0.5), n_docs=10)
    with pytest.raises(ValueError, match="min_terms"):
        generate_corpus(CorpusConfig(min_terms=1), n_docs=10)
    with pytest.raises(ValueError, match="p_check"):
        generate_corpus(CorpusConfig(p_check=1.5), n_docs=10)


def test_templated_questions_follow_reasoning_gym_format(docs: list[str], kinds: list[str]) -> None:
    for doc, kind in zip(docs, kinds):
        if kind == "plain":
            assert not doc.startswith(r1_zero_prompt("")[:40])
            continue
        question, completion = split_document(doc)
        assert CHAIN_SUM_QUESTION_RE.match(question), question
        assert doc == f"{r1_zero_prompt(question)} {completion}<|endoftext|>"
        problem = ChainProblem.from_question(question)
        assert CFG.min_terms <= len(problem.terms) <= CFG.max_terms
        digits = {len(str(t)) for t in problem.terms}
        # one digit count per problem, as in reasoning-gym (1 digit means 0-9)
        assert len(digits) == 1 and CFG.min_digits <= digits.pop() <= CFG.max_digits


def test_careful_reasoning_is_correct(docs: list[str], kinds: list[str]) -> None:
    careful = _docs_of(docs, kinds, "careful", "careful_zh_mix", "careful_zh_full")
    assert careful
    for doc in careful:
        question, completion = split_document(doc)
        gold = ChainProblem.from_question(question).answer
        assert answer_text(completion) == str(gold)
        equations = find_equations(think_text(completion))
        steps = len(ChainProblem.from_question(question).terms) - 1
        assert sum(1 for _, holds, _ in equations if holds) >= steps
        for equation, holds, retracted in equations:
            # the only false statements allowed are slips immediately taken back with "Wait"
            assert holds or retracted, (equation, doc)
        for i, (equation, holds, retracted) in enumerate(equations):
            if retracted:  # the slip is followed by the same step done right
                left = equation.split(" = ")[0]
                assert not holds and equations[i + 1][0].startswith(left + " = ") and equations[i + 1][1]
        # the last value worked out before any check step is the answer
        worked = [eq for eq, _, retracted in find_equations(think_text(completion).split("Check:")[0]) if not retracted]
        assert int(worked[-1].split(" = ")[-1]) == gold


def test_chinese_only_inside_think(docs: list[str], kinds: list[str]) -> None:
    mixed = _docs_of(docs, kinds, "careful_zh_mix", "careful_zh_full")
    assert mixed
    for doc in mixed:
        question, completion = split_document(doc)
        think = think_text(completion)
        assert has_cjk(think)
        outside = doc.replace(think, "")
        assert not has_cjk(outside), doc
    for doc in _docs_of(docs, kinds, "careful_zh_mix"):
        think = think_text(split_document(doc)[1])
        # the switch happens after English reasoning has started
        assert re.match(r"^[^\u4e00-\u9fff]*\d+ [+-] -?\d+ = -?\d+\.", think), think
    for doc in _docs_of(docs, kinds, "careful", "lazy"):
        assert not has_cjk(doc)


def test_lazy_and_bad_format_documents(docs: list[str], kinds: list[str]) -> None:
    for doc in _docs_of(docs, kinds, "lazy"):
        _, completion = split_document(doc)
        assert is_well_formatted(completion)
        assert len(think_text(completion)) <= 30
    bad = [split_document(d)[1] for d in _docs_of(docs, kinds, "bad_format")]
    assert all(not is_well_formatted(c) for c in bad)
    # several different breakages are present
    assert any("<answer>" in c and "</answer>" not in c for c in bad)
    assert any("<answer>" not in c for c in bad)
    assert any(c.count("<think>") > 1 or c.count("<answer>") > 1 for c in bad)
    assert any("<think>" not in c for c in bad)
    assert any("<think>" in c and "</think>" not in c for c in bad)


def test_plain_documents_are_bilingual(docs: list[str], kinds: list[str]) -> None:
    plain = _docs_of(docs, kinds, "plain")
    assert any(has_cjk(d) for d in plain) and any(not has_cjk(d) for d in plain)
    assert all(d.endswith("<|endoftext|>") and "<think>" not in d for d in plain)
    for doc in plain:
        assert all(holds for _, holds, _ in find_equations(doc))


def test_exclude_skips_questions() -> None:
    cfg = CorpusConfig(min_terms=2, max_terms=2, min_digits=1, max_digits=1)  # only 200 questions exist
    banned = {ChainProblem((a, b), (op,)).question for a in range(10) for b in range(5) for op in "+-"}
    docs = generate_corpus(cfg, n_docs=500, seed=0, exclude=banned)
    questions = {split_document(d)[0] for d in docs if split_document(d)}
    assert questions and not questions & banned
    cold = generate_cold_start(100, seed=0, min_terms=2, max_terms=2, max_digits=1, exclude=banned)
    assert not {c["question"] for c in cold} & banned


def test_cold_start_is_clean_english_long_cot() -> None:
    items = generate_cold_start(300, seed=0)
    corpus_questions = {split_document(d)[0] for d in generate_corpus(n_docs=300, seed=0) if split_document(d)}
    assert len({c["question"] for c in items} & corpus_questions) < 30  # separate random stream
    for item in items:
        completion = item["completion"]
        assert not has_cjk(item["prompt"] + completion)
        assert is_well_formatted(completion), completion
        assert item["prompt"] == r1_zero_prompt(item["question"])
        problem = ChainProblem.from_question(item["question"])
        assert answer_text(completion) == item["answer"] == str(problem.answer)
        think = think_text(completion)
        equations = find_equations(think)
        assert equations and all(holds for _, holds, _ in equations), think
        assert "Check:" in think and "Correct." in think and "Wait" not in think


def test_pretrain_texts_cover_corpus_and_cold_start() -> None:
    texts = pretrain_texts(n_docs=100, n_cold_start=10)
    assert len(texts) == 110
    assert any("Check:" in t for t in texts) and any(has_cjk(t) for t in texts)
