"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`.

r1lab never implements BPE itself. This module adds only what the rest of r1lab needs on top of the
HF backend:

* the special tokens R1 relies on (`<|endoftext|>`, ChatML `<|im_start|>`/`<|im_end|>`, and the
  reasoning tags `<think>`, `</think>`, `<answer>`, `</answer>` as single tokens that `decode` keeps,
  because rewards parse them);
* `apply_chat_template`, rendering a model's own jinja chat template the way `transformers` does, or a
  built-in ChatML template;
* `train_bpe`, a deterministic byte-level BPE trainer (digits split one by one so arithmetic is
  learnable) used to build the tokenizer of the shipped tiny base model;
* folder I/O that `transformers.AutoTokenizer.from_pretrained` reads and that also loads real HF
  tokenizer folders (Qwen, Llama, DeepSeek).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from r1lab.errors import InputError
from r1lab.fsutil import read_json_object

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"

# Tags that rewards parse out of decoded text. They are added tokens (one id each) but NOT "special",
# so even decode(..., skip_special_tokens=True) keeps them.
REASONING_TAGS: tuple[str, ...] = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)

# Default added tokens of a tokenizer trained by r1lab; the first one is EOS (and padding).
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START, IM_END, *REASONING_TAGS)

# Tokens that end a generation when present in a vocabulary, whatever the config calls EOS
# (Qwen's config says <|im_end|> but base-model style text ends in <|endoftext|>).
_KNOWN_STOP_TOKENS = (EOS_TOKEN, IM_END, "<｜end▁of▁sentence｜>", "<|eot_id|>", "<|end_of_text|>")

# Built-in ChatML template, used when a tokenizer has no chat template of its own. It is written to
# tokenizer_config.json on save so that transformers renders exactly the same text.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the special-token and chat-template knowledge r1lab needs.

    `encode` never inserts tokens on its own (the backend's post-processor is bypassed); a BOS token is
    prepended only when asked with `add_bos=True` and the tokenizer has one. `encode_prompt(s)` is the one
    BOS rule every prompt goes through (training, sampling, evaluation, serving): BOS first when this
    tokenizer adds one to the text it encodes (its post-processor does, as Llama's and DeepSeek's do; Qwen's
    does not), the text does not already begin with it, and no chat template rendered the text (a chat
    template decides about BOS itself, as transformers' apply_chat_template(tokenize=True) leaves it).
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        eos_token: str | None = EOS_TOKEN,
        pad_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        self._extra_stop_ids = tuple(int(i) for i in extra_stop_ids)
        for role, token in (("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary")
        self.adds_bos = self._post_processor_adds_bos()

    def _post_processor_adds_bos(self) -> bool:
        """Whether encoding with the backend's special tokens puts this tokenizer's BOS first."""
        bos = self.bos_id
        if bos is None:
            return False
        with_special = self.backend.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == bos and self.backend.encode(
            "a", add_special_tokens=False).ids[:1] != [bos]

    # ----------------------------------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_id(self, token: str) -> int:
        """Id of one token string (e.g. "<think>"); KeyError if the vocabulary has no such token."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def _optional_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self._optional_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """Padding id; falls back to EOS, as most causal LMs pad with it."""
        pad = self._optional_id(self.pad_token)
        return self.eos_id if pad is None else pad

    @property
    def bos_id(self) -> int | None:
        return self._optional_id(self.bos_token)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: EOS, the end-of-turn/end-of-text tokens the vocabulary has, and
        any ids listed in the folder's generation_config.json."""
        ids = {self.eos_id, *self._extra_stop_ids}
        ids.update(self.backend.token_to_id(t) for t in _KNOWN_STOP_TOKENS)
        return sorted(i for i in ids if i is not None)

    # ------------------------------------------------------------------------------- encode/decode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def _prompt_needs_bos(self, text: str, chat: bool) -> bool:
        return self.adds_bos and not chat and not (self.bos_token and text.startswith(self.bos_token))

    def encode_prompt(self, text: str, *, chat: bool = False) -> list[int]:
        """Ids of a prompt under the BOS rule (class docstring); chat: a chat template rendered the text."""
        return self.encode(text, add_bos=self._prompt_needs_bos(text, chat))

    def encode_prompts(self, texts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
        """encode_prompt of many texts in one batched call (HF tokenizers release the GIL in it)."""
        ids = self.encode_batch(list(texts))
        return [[self.bos_id, *row] if self._prompt_needs_bos(text, chat) else row for text, row in zip(texts, ids)]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [prefix + e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Reasoning tags are never skipped (they are not "special")."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    # ------------------------------------------------------------------------------- chat template
    @property
    def has_own_chat_template(self) -> bool:
        """A chat template of its own (a real instruct / R1-distill model); r1lab's own base models carry only
        the built-in ChatML fallback and were trained on R1-Zero-template documents, never on ChatML."""
        return bool(self.chat_template) and self.chat_template != CHATML_TEMPLATE

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) to prompt text.

        Uses the tokenizer's own jinja template when it has one (rendered with the same environment
        and variables transformers uses, so Qwen/Llama/DeepSeek templates give identical text), else
        the built-in ChatML template. Extra keyword arguments (e.g. `enable_thinking`) reach the
        template as variables.
        """
        template = _compile_chat_template(self.chat_template or CHATML_TEMPLATE)
        variables: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            **kwargs,
        }
        return template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
        )

    # -------------------------------------------------------------------------------------- I/O
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and, when present, tokenizer_config.json, chat_template.jinja,
        special_tokens_map.json and generation_config.json from a folder (an r1lab asset or a real HF
        tokenizer/model folder). `path` may also name a tokenizer.json file directly."""
        path = Path(path)
        folder = path.parent if path.is_file() else path
        tokenizer_file = path if path.is_file() else path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {folder}: r1lab loads fast (tokenizers) tokenizer files only"
            )
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
            raise InputError(f"{tokenizer_file}: not a readable tokenizer.json ({err}): truncated or damaged, "
                             "copy or save it again") from None
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")

        def special(name: str) -> str | None:
            value = config.get(name, special_map.get(name))
            if isinstance(value, dict):  # older configs store AddedToken dicts
                value = value.get("content")
            return value if isinstance(value, str) else None

        eos = special("eos_token")
        if eos is None and backend.token_to_id(EOS_TOKEN) is not None:
            eos = EOS_TOKEN
        chat_template = _pick_chat_template(config.get("chat_template"))
        jinja_file = folder / "chat_template.jinja"
        if chat_template is None and jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")

        generation_config = _read_json(folder / "generation_config.json")
        extra_stop = generation_config.get("eos_token_id", [])
        extra_stop = [extra_stop] if isinstance(extra_stop, int) else list(extra_stop or [])

        return cls(
            backend,
            eos_token=eos,
            pad_token=special("pad_token"),
            bos_token=special("bos_token"),
            chat_template=chat_template,
            extra_stop_ids=extra_stop,
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json, a folder that
        `transformers.AutoTokenizer.from_pretrained` loads as a PreTrainedTokenizerFast."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token if self.pad_token is not None else self.eos_token,
            "bos_token": self.bos_token,
            "add_bos_token": self.adds_bos,
            "add_eos_token": False,
            # transformers would otherwise "clean up" spaces before punctuation and break round trips
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": self.chat_template or CHATML_TEMPLATE,
        }
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load an r1lab tokenizer folder or a real HF tokenizer folder (e.g. Qwen's tokenizer.json +
    tokenizer_config.json with its chat template)."""
    return Tokenizer.from_dir(path)


# ------------------------------------------------------------------------------------ training
def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with HF `tokenizers`.

    * every byte is in the base alphabet, so any unicode text (Chinese, emoji, newlines) round-trips;
    * digits are pre-split one by one, so numbers are digit sequences the model can do arithmetic on;
    * `special_tokens` get ids 0..n-1 in the given order; the first one is EOS and padding. The
      reasoning tags among them are added as non-special tokens (decode always keeps them);
    * deterministic: the same texts in the same order give the same vocabulary and merges.

    `vocab_size` counts the special tokens; the result can be smaller when the texts support fewer
    merges.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    if not special_tokens:
        raise ValueError("train_bpe needs at least one special token (the first is used as EOS)")
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus special tokens ({minimum})")

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer does not split added tokens out of its input, so it would learn merges such as
    # "think>" or "<|endoft"; feed it the text between those tokens instead.
    splitter = re.compile("|".join(re.escape(t) for t in special_tokens))

    def pieces() -> Iterator[str]:
        for text in texts:
            yield from (piece for piece in splitter.split(text) if piece)

    backend.train_from_iterator(pieces(), trainer)
    # The trainer registered every token as special; mark the reasoning tags non-special (same ids).
    # add_tokens only updates the serialized flags, while decode's skip list stays as trained, so the
    # backend is rebuilt from its JSON form to make decode(skip_special_tokens=True) keep the tags.
    tags = [t for t in special_tokens if t in REASONING_TAGS]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    backend = HFTokenizer.from_str(backend.to_str())
    return Tokenizer(backend, eos_token=special_tokens[0], pad_token=special_tokens[0])


# ------------------------------------------------------------------------- jinja (transformers-like)
class _GenerationBlock(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by some HF templates to mark assistant
    text for masks) and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _to_json(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Templates emit tool schemas and arguments; keep non-ASCII text readable like transformers does.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


_template_cache: dict[str, jinja2.Template] = {}


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile with the settings transformers uses (sandbox, trim/lstrip blocks, loop controls,
    raise_exception, strftime_now, tojson), so real chat templates render identically."""
    if source not in _template_cache:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _to_json
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _template_cache[source] = env.from_string(source)
    return _template_cache[source]


def _pick_chat_template(value: Any) -> str | None:
    """tokenizer_config.json stores a string or a list of {"name", "template"}; prefer "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, InputError) if path.is_file() else {}
