"""Tools inside the reasoning: a sandboxed Python interpreter the model calls while it thinks.

The protocol is text, so every tokenizer carries it. Inside its reasoning the model writes

    <python>
    print(4817 * 2293)
    </python>

and the rollout engine pauses that sample (the others keep decoding), runs the code in the bubblewrap
sandbox (r1lab.sandbox: no network, no host files, time / memory / output limits), appends

    <output>
    11045381
    </output>

as tokens marked "not trained", and resumes the sample in the same KV cache. The reply's token ids are
appended to the sampled ones as they are: the sequence a trainer sees is exactly the sampled ids plus the
reply ids, never a re-tokenization of the decoded history (the drift verl users report across turns).

`PythonTool` holds the protocol and the limits; `PythonTool.hook(tokenizer)` gives the engine its
`ToolHook` (detect a finished call, answer it with token ids). Rewards score the text with the tool
outputs taken out (`PythonTool.without_outputs`), so a program that prints "<answer>42</answer>" earns
nothing.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

from r1lab.config import check_ranges

__all__ = ["PythonTool", "ToolHook", "ToolReply", "ToolResult"]

_FENCE = re.compile(r"^\s*```(?:python|py)?\s*\n(.*?)\n?\s*```\s*$", re.S)


@dataclass(frozen=True)
class ToolResult:
    """What one call produced, as the model will read it."""

    text: str
    """stdout, then the last lines of stderr when the program failed; cut to max_output_chars."""
    error: bool
    """The program raised, exited non-zero, ran out of time or memory, or wrote too much."""
    duration_s: float = 0.0


@dataclass(frozen=True)
class ToolReply:
    """The engine's view of a call's answer."""

    token_ids: list[int]
    """Tokens appended to the sample (not trained)."""
    error: bool
    """The call failed (see ToolResult.error), or it was over the call limit and did not run."""


@dataclass
class PythonTool:
    """A Python interpreter in the sandbox, called from inside the model's reasoning."""

    call_open: str = "<python>"
    """Text that opens a call; the code follows (optionally in a ```python fence)."""
    call_close: str = "</python>"
    """Text that ends a call: the engine pauses the sample when it generates it."""
    output_open: str = "<output>"
    """Text that opens the reply."""
    output_close: str = "</output>"
    """Text that closes the reply; generation resumes after it."""
    timeout_s: float = 2.0
    """Wall-clock limit of one call (a hanging call costs its own sample this long, nothing more)."""
    memory_mb: int = 256
    """Memory budget of one call (all its processes and /tmp files)."""
    max_output_chars: int = 400
    """Longest reply text; longer output is cut and marked."""
    max_calls: int = 4
    """Calls run per answer; later ones are answered with a refusal and do not run."""
    allow_unsafe: bool | None = None
    """Run without isolation where bwrap is missing (None: the R1LAB_ALLOW_UNSANDBOXED variable); see
    r1lab.sandbox.run_python. Off by default: model-written code runs only in the sandbox."""

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"memory_mb": 16, "max_output_chars": 16, "max_calls": 0},
                     positive=("timeout_s",))
        for name in ("call_open", "call_close", "output_open", "output_close"):
            if not getattr(self, name):
                raise ValueError(f"PythonTool.{name} must not be empty")

    # ------------------------------------------------------------------ protocol
    def pending_code(self, text: str) -> str | None:
        """The code of the call `text` has just closed (its last call_close, with no reply after it), or
        None when the text does not end an unanswered call."""
        end = text.rfind(self.call_close)
        if end < 0 or self.output_open in text[end:]:
            return None
        start = text.rfind(self.call_open, 0, end)
        if start < 0:
            return None
        code = text[start + len(self.call_open):end]
        fenced = _FENCE.match(code)
        # models often indent the block as a whole (Qwen2.5 does); Python would refuse the first line
        return textwrap.dedent((fenced.group(1) if fenced else code).strip("\n")).strip()

    def reply_text(self, result: ToolResult) -> str:
        """The reply appended after a call: output_open, the result, output_close, each on its own line."""
        return f"\n{self.output_open}\n{result.text}\n{self.output_close}\n"

    def without_outputs(self, text: str) -> str:
        """`text` with every reply removed (what rewards score: the model's own words and code)."""
        pattern = re.escape(self.output_open) + r".*?" + re.escape(self.output_close)
        return re.sub(pattern, "", text, flags=re.S)

    @property
    def usage(self) -> str:
        """One sentence that tells a model how to call the tool (for a prompt's instruction)."""
        return (f"You can run Python while you think: write code between {self.call_open} and {self.call_close}, "
                f"and what it prints appears between {self.output_open} and {self.output_close}.")

    def count_calls(self, text: str) -> int:
        return text.count(self.call_close)

    # ------------------------------------------------------------------ execution
    def run(self, code: str) -> ToolResult:
        """Run `code` in the sandbox and turn what it did into the text the model reads."""
        from r1lab.sandbox import run_python

        result = run_python(code, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                            max_output_bytes=4 * self.max_output_chars, allow_unsafe=self.allow_unsafe)
        if result.timed_out:
            return ToolResult(f"TimeoutError: the call ran longer than {self.timeout_s:g} s", True, result.duration_s)
        if result.memory_exceeded:
            return ToolResult(f"MemoryError: the call used more than {self.memory_mb} MB", True, result.duration_s)
        text = result.stdout
        failed = result.returncode != 0 or result.output_truncated
        if result.returncode != 0 and result.stderr.strip():
            # the traceback's last line names the error; the frames above it are the sandbox's harness
            text += result.stderr.strip().splitlines()[-1]
        text = text.rstrip("\n")
        if len(text) > self.max_output_chars or result.output_truncated:
            text = text[: self.max_output_chars] + f"... [output cut at {self.max_output_chars} characters]"
        return ToolResult(text, failed, result.duration_s)

    def hook(self, tokenizer: Any) -> "ToolHook":
        """The engine-side object for this tool and tokenizer."""
        return ToolHook(self, tokenizer)


class ToolHook:
    """What the rollout engine needs from a tool: `close_text` (generated text that may end a call; checked
    like a stop string) and `respond(token_ids)` (blocking; the engine runs it on a worker thread): the
    reply's token ids for the call the sample has just closed, or None when the text holds no call."""

    def __init__(self, tool: PythonTool, tokenizer: Any) -> None:
        from r1lab.sandbox import SandboxUnavailable, isolated

        try:  # refuse now, not at the first call in the middle of a rollout
            isolated(tool.allow_unsafe)
        except SandboxUnavailable as exc:
            raise SandboxUnavailable(f"the python tool needs the bubblewrap sandbox: {exc}") from exc
        self.tool, self.tokenizer = tool, tokenizer
        self.close_text = tool.call_close

    def respond(self, token_ids: Sequence[int]) -> ToolReply | None:
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        code = self.tool.pending_code(text)
        if code is None:
            return None
        if self.tool.count_calls(text) > self.tool.max_calls:
            result = ToolResult(f"the call limit ({self.tool.max_calls} per answer) is reached; "
                                "this call did not run", True)
        else:
            result = self.tool.run(code)
        return ToolReply(self.tokenizer.encode(self.tool.reply_text(result)), result.error)
