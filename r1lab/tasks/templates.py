"""Prompt templates: the R1-Zero template, the chat form used with released R1 models, and
user-defined templates."""

from __future__ import annotations

from typing import Any, Callable


# DeepSeek-R1 paper, Table 1. Generation starts right after "Assistant:".
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {question}. Assistant:"
)

# DeepSeek-R1 usage recommendation for math, appended to the user turn (no system prompt).
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = ("Please reason step by step, and put your final solution in a single "
                    "```python code block.")

ChatTemplateFn = Callable[..., Any]

# What ends a prompt that opens the thought (DeepSeek's advice for the released R1 models): the chat turn
# gets "<think>\n", the R1-Zero template's "Assistant:" gets " <think>".
_FORCED_THINK = {"chat": "<think>\n", "r1_zero": " <think>"}


def forced_think_prefix(template: str) -> str:
    """The text `render_prompt(..., force_think=True)` appends for `template`."""
    return _FORCED_THINK.get(template, "<think>\n")


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt for ``question``."""
    return R1_ZERO_TEMPLATE.format(question=question)


def chat_prompt(question: str, apply_chat_template: ChatTemplateFn, *,
                instruction: str | None = MATH_INSTRUCTION) -> str:
    """A single user turn (question + newline + instruction) rendered by a chat template.

    ``apply_chat_template`` is called like Hugging Face's
    ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` and
    must return the prompt text.
    """
    content = question if not instruction else f"{question}\n{instruction}"
    messages = [{"role": "user", "content": content}]
    text = apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError("apply_chat_template must return text (call it with tokenize=False)")
    return text


def render_prompt(template: str, question: str, *, apply_chat_template: ChatTemplateFn | None = None,
                  instruction: str | None = MATH_INSTRUCTION, force_think: bool = False) -> str:
    """Render ``question`` with a named template or a user-defined one.

    ``template`` is ``"r1_zero"``, ``"chat"`` (needs ``apply_chat_template``), ``"plain"`` (the
    question alone), or any string containing ``{question}``. Only that placeholder is replaced,
    so other braces (``\\boxed{}``, JSON) in a custom template are left alone. ``force_think``
    ends the prompt with an open ``<think>`` (:func:`forced_think_prefix`), so generation starts
    inside the thought, as DeepSeek recommends for the released models.
    """
    text = _render(template, question, apply_chat_template, instruction)
    return text + forced_think_prefix(template) if force_think else text


def _render(template: str, question: str, apply_chat_template: ChatTemplateFn | None,
            instruction: str | None) -> str:
    if template == "r1_zero":
        return r1_zero_prompt(question)
    if template == "chat":
        if apply_chat_template is None:
            raise ValueError("the 'chat' template needs apply_chat_template=tokenizer.apply_chat_template")
        return chat_prompt(question, apply_chat_template, instruction=instruction)
    if template == "plain":
        return question
    if "{question}" not in template:
        raise ValueError(
            f"unknown template {template!r}: use 'r1_zero', 'chat', 'plain' or a string "
            f"containing {{question}}")
    return template.replace("{question}", question)
