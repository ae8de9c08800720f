"""Distillation: traces cross tokenizers as text, the student (another architecture) learns them."""

import json

import pytest

import r1lab.model as rm
from r1lab.tasks.corpus import generate_cold_start, pretrain_texts
from r1lab.pipeline.distill import DistillConfig, distill, retemplate, retokenization_stats
from r1lab.pipeline.rejection import FilterConfig
from r1lab.tokenizer import train_bpe
from r1lab.run_dir import read_jsonl
from r1lab.train.sft import SFTConfig, encode_example


@pytest.fixture(scope="module")
def teacher_tok():
    return train_bpe(pretrain_texts(n_docs=300, n_cold_start=50), vocab_size=420)


@pytest.fixture(scope="module")
def student_tok():
    # Another vocabulary: other training text, another size, special tokens in another order.
    texts = [item["prompt"] + " " + item["completion"] for item in generate_cold_start(80, seed=9)]
    return train_bpe(texts, vocab_size=330, special_tokens=("<|endoftext|>", "<think>", "</think>", "<answer>",
                                                             "</answer>", "<|im_start|>", "<|im_end|>"))


def _traces(n=24):
    return [{**r, "gold": r["answer"]} for r in generate_cold_start(n, seed=3)]


def test_retokenization_round_trips_across_tokenizers(teacher_tok, student_tok):
    assert teacher_tok.vocab_size != student_tok.vocab_size
    assert teacher_tok.token_id("<think>") != student_tok.token_id("<think>")
    records = _traces(6)
    for r in records:
        text = r["prompt"] + " " + r["completion"]
        t_ids, s_ids = teacher_tok.encode(text), student_tok.encode(text)
        assert t_ids != s_ids
        assert teacher_tok.decode(t_ids) == text == student_tok.decode(s_ids)  # text is the interchange format
        ids, mask = encode_example(r, student_tok)
        assert student_tok.decode(ids) == text + "<|endoftext|>"
        assert student_tok.decode([i for i, m in zip(ids, mask) if m]) == " " + r["completion"] + "<|endoftext|>"
    stats = retokenization_stats(records, student_tok)
    assert stats["retokenized_exact"] == 1.0 and 0 < stats["student_tokens_per_char"] < 1
    # chat prompts are re-rendered from the question with the student's template
    chat = retemplate([{**records[0], "prompt": "teacher-specific"}], "chat", student_tok)
    assert chat[0]["prompt"].startswith("<|im_start|>user\n" + records[0]["question"])
    assert retemplate(records[:1], "r1_zero", student_tok)[0]["prompt"] == records[0]["prompt"]
    # template None: the template each record was sampled with (an instruct teacher's default is chat), and
    # the instruction the teacher was asked with carries over to the student's prompt
    sampled = [{**records[0], "prompt": "teacher-specific", "source": {"template": "chat"}},
               {**records[1], "source": {"template": "r1_zero"}}]
    own = retemplate(sampled, None, student_tok, instruction="Answer in <answer> tags.")
    assert own[0]["prompt"].startswith("<|im_start|>user\n" + records[0]["question"] + "\nAnswer in <answer> tags.")
    assert own[1]["prompt"] == records[1]["prompt"]


def _sft(**kw):
    base = dict(epochs=6, lr=1e-2, warmup_steps=2, tokens_per_step=2000, micro_batch_tokens=512, max_len=512,
                save_every=0, weight_decay=0.0)
    return SFTConfig(**{**base, **kw})


def test_student_of_another_architecture_learns_teacher_traces(teacher_tok, student_tok, tmp_path):
    cfg = DistillConfig(student="tiny-dense", student_model={"model_type": "llama", "hidden_size": 48,
                                                             "num_attention_heads": 4, "num_key_value_heads": 1},
                        sft=_sft())
    traces = _traces(24) + [{**_traces(1)[0], "completion": "<think> 混合 mixed 中文 words here </think> <answer> 1 </answer>"}]
    result = distill(cfg, tmp_path, teacher_records=traces, teacher_tokenizer=teacher_tok,
                     student_tokenizer=student_tok, log=lambda s: None)
    s = result.stats
    assert s["filter_kept"] == 24 and s["filter_rejected_language"] == 1  # the rejection filters apply
    assert s["sft_final_loss"] < 0.6 * s["sft_first_loss"]
    student = rm.load(result.student_path)
    assert student.args.model_type == "llama" and student.args.hidden_size == 48
    assert student.args.vocab_size == student_tok.vocab_size == s["student_vocab_size"]
    assert (result.student_path / "tokenizer.json").is_file()
    assert len(read_jsonl(tmp_path / "teacher_records.jsonl")) == 25
    assert json.loads((tmp_path / "summary.json").read_text())["student_model_type"] == "llama"


def test_moe_teacher_samples_and_dense_student_trains(teacher_tok, student_tok, tmp_path):
    teacher = rm.build(rm.preset("tiny-moe", vocab_size=teacher_tok.vocab_size, eos_token_id=teacher_tok.eos_id))
    problems = [{"question": f"{a} + 1 =", "gold": str(a + 1)} for a in range(4)]
    cfg = DistillConfig(k=2, temperature=0.0, max_new_tokens=10, sft=_sft(epochs=3),
                        filters=FilterConfig(min_score=0.0, require_format=False, language_threshold=0.0,
                                             reject_truncated=False, max_paragraph_chars=None, max_per_prompt=2))
    logs = []
    result = distill(cfg, tmp_path, teacher=teacher, teacher_tokenizer=teacher_tok, problems=problems,
                     student_tokenizer=student_tok, log=logs.append)
    s = result.stats
    assert s["teacher_model_type"] == "deepseek_v3" and s["student_model_type"] == "qwen2"
    assert s["teacher_parameters"] != s["student_parameters"]
    assert s["sampling_samples"] == 8 and s["sampling_rejected_duplicate"] == 4  # greedy: both samples agree
    assert rm.load(result.student_path).args.model_type == "qwen2"
    # a rerun of the same directory reuses the saved traces and the finished student run
    again = distill(cfg, tmp_path, student_tokenizer=student_tok, log=logs.append)
    assert any("reusing 4 teacher traces" in line for line in logs)
    assert again.stats["sampling_kept"] == 4 and again.student_path == result.student_path
    assert again.stats["sft_final_loss"] == result.stats["sft_final_loss"]
