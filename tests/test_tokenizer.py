"""Tests for r1lab.tokenizer: BPE training, round trips, special tokens, HF compatibility, chat templates."""

from __future__ import annotations

import json
import random

import pytest

from r1lab.tasks.corpus import generate_cold_start, generate_corpus, make_document
from r1lab.tokenizer import (
    CHATML_TEMPLATE,
    REASONING_TAGS,
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)


def _training_texts() -> list[str]:
    docs = generate_corpus(n_docs=600, seed=11)
    docs += [make_document(c["prompt"], c["completion"]) for c in generate_cold_start(50, seed=11)]
    # a little general text so merges exist for words outside the corpus too
    docs += ["Hello world! The quick brown fox jumps over the lazy dog.\n你好，世界。\tTabs and\nnewlines."] * 5
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(_training_texts(), vocab_size=600)


@pytest.fixture(scope="module")
def saved_dir(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


def _random_unicode(rng: random.Random) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \n\t\r  \n\n",
        "+-=.,;:!?'\"()[]{}<>/\\|@#$%^&*_~`",
        "加减等于所以答案是我们一步一步算你好世界数学",
        "😀🚀🧮🇨🇳👍🏽",
        "éüñçßøΩπ∑√∞ÅĀ",
        "\u0301\u200b\u00a0\u3000\ufeff",  # combining accent, zero-width space, nbsp, ideographic space, BOM
        "ひらがなカタカナ한국어العربيةעברית",
    ]
    parts = []
    for _ in range(rng.randint(0, 40)):
        pool = rng.choice(pools)
        parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
    if rng.random() < 0.3:  # arbitrary code points (surrogates excluded: not encodable as UTF-8)
        parts.append("".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(5)))
    return "".join(parts)


def test_round_trip_random_unicode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = _random_unicode(rng)
        assert tok.decode(tok.encode(text)) == text


def test_round_trip_corpus_documents(tok: Tokenizer) -> None:
    for doc in generate_corpus(n_docs=200, seed=99):
        assert tok.decode(tok.encode(doc)) == doc


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    ids = [tok.token_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))  # trained tokenizers put them first, in order
    for token in SPECIAL_TOKENS:
        assert tok.encode(token) == [tok.token_id(token)]
        # also inside text, glued to other characters
        assert tok.token_id(token) in tok.encode(f"x{token}y 12{token}")
    assert tok.eos_id == tok.pad_id == tok.token_id("<|endoftext|>")
    assert tok.bos_id is None
    assert tok.stop_ids == sorted({tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")})


def test_decode_keeps_reasoning_tags(tok: Tokenizer) -> None:
    text = "<think> 12 + 7 = 19. </think> <answer> 19 </answer><|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    skipped = tok.decode(ids, skip_special_tokens=True)
    for tag in REASONING_TAGS:
        assert tag in skipped
    assert "<|endoftext|>" not in skipped


def test_digits_are_split_individually(tok: Tokenizer) -> None:
    for token in tok.backend.get_vocab():
        assert sum(ch.isdigit() for ch in token) <= 1, token
    ids = tok.encode("12345 + 67 = 12412")
    tokens = tok.convert_ids_to_tokens(ids)
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("12345") + list("67") + list("12412")


def test_training_is_deterministic(tok: Tokenizer) -> None:
    again = train_bpe(_training_texts(), vocab_size=600)
    assert again.backend.to_str() == tok.backend.to_str()


def test_vocab_size_below_byte_alphabet_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)


def test_save_and_load_round_trip(tok: Tokenizer, saved_dir) -> None:
    loaded = load_tokenizer(saved_dir)
    text = "User: 12 + 7 - 3 =. Assistant: <think> 12 加 7 等于 19。 </think> <answer> 16 </answer>"
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.eos_id, loaded.pad_id, loaded.bos_id, loaded.vocab_size) == (tok.eos_id, tok.pad_id, None, tok.vocab_size)
    assert loaded.chat_template == CHATML_TEMPLATE
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_missing_tokenizer_json_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_builtin_chatml_template(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12 + 7?"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids.count(tok.token_id("<|im_start|>")) == 3


def test_hf_autotokenizer_loads_and_matches(tok: Tokenizer, saved_dir) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved_dir))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    rng = random.Random(1)
    texts = [d for d in generate_corpus(n_docs=30, seed=5)] + [_random_unicode(rng) for _ in range(30)]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf(text)["input_ids"] == tok.encode(text)  # no BOS/EOS added behind our back
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    messages = [{"role": "user", "content": "State the final answer: 1 + 2 ="}]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == tok.apply_chat_template(messages)


# A Qwen-style tokenizer_config: eos <|im_end|>, pad <|endoftext|>, no BOS, a template that uses
# namespace(), loop controls, raise_exception, tojson and extra variables, as real ones do.
QWEN_LIKE_TEMPLATE = """{%- if tools %}{{- '<|im_start|>system\\n' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message.role) }}{%- endif %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in message.content %}
        {{- '<|im_start|>assistant\\n' + message.content.split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}
        {%- continue %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""


@pytest.fixture()
def qwen_like_dir(tok: Tokenizer, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},  # older dict form
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": QWEN_LIKE_TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return tmp_path


def test_load_hf_style_folder_with_jinja_template(qwen_like_dir) -> None:
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(qwen_like_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen_like_dir))
    assert ours.eos_id == ours.token_id("<|im_end|>") and ours.pad_id == ours.token_id("<|endoftext|>")
    assert ours.stop_ids == [0, 2]
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "1 + 2 ="},
        {"role": "assistant", "content": "<think>\n1 + 2 = 3\n</think>\n\n3"},
        {"role": "user", "content": "和 3 + 4 ="},
    ]
    for kwargs in ({}, {"enable_thinking": False}, {"tools": [{"name": "calc", "description": "计算"}]}):
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt=True, **kwargs) == expected
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])


def test_chat_template_jinja_file_is_read(tok: Tokenizer, tmp_path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token == "<|endoftext|>"  # no config: falls back to the known EOS token
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"


def test_bos_and_batch_encoding(tok: Tokenizer) -> None:
    with_bos = Tokenizer(tok.backend, eos_token="<|endoftext|>", bos_token="<|im_start|>")
    text = "12 + 7 = 19"
    assert with_bos.encode(text, add_bos=True) == [with_bos.bos_id, *tok.encode(text)]
    assert tok.encode(text, add_bos=True) == tok.encode(text)  # no BOS token: nothing to add
    assert with_bos.encode_batch([text, "x"], add_bos=True) == [with_bos.encode(t, add_bos=True) for t in (text, "x")]
    with pytest.raises(KeyError):
        tok.token_id("<not-a-token>")
    with pytest.raises(ValueError, match="bos_token"):
        Tokenizer(tok.backend, bos_token="<not-a-token>")


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_a_damaged_tokenizer_json_is_one_line_naming_the_file(tmp_path, damage):
    from r1lab.errors import InputError
    from r1lab.model import DEFAULT_MODEL_DIR

    text = (DEFAULT_MODEL_DIR / "tokenizer.json").read_text()
    broken = {"truncate": text[: len(text) // 2], "empty": "", "garbage": "{not json"}[damage]
    (tmp_path / "tokenizer.json").write_text(broken)
    with pytest.raises(InputError) as error:
        load_tokenizer(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "tokenizer.json") in message and "\n" not in message
