"""The Python tool: its text protocol, what a call's reply says, and the sandbox's adversarial suite run
through the tool path (nothing escapes, the calling process is unharmed, a hanging call costs its own time)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from r1lab.model import DEFAULT_MODEL_DIR
from r1lab.sandbox import sandbox_available
from r1lab.tokenizer import load_tokenizer
from r1lab.tools import PythonTool, ToolResult

PROJECT_ROOT = Path(__file__).resolve().parents[1]
needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap sandbox unavailable")


def call(code: str, tool: PythonTool | None = None) -> str:
    tool = tool or PythonTool()
    return f"Let me check. {tool.call_open}\n{code}\n{tool.call_close}"


def test_pending_code_finds_the_call_just_closed():
    tool = PythonTool()
    assert tool.pending_code(call("print(2 + 2)")) == "print(2 + 2)"
    fenced = call("```python\nx = 3\nprint(x * x)\n```")
    assert tool.pending_code(fenced) == "x = 3\nprint(x * x)"
    answered = call("print(1)") + tool.reply_text(ToolResult("1", False))
    assert tool.pending_code(answered) is None  # its reply is already there
    second = answered + " and now " + call("print(5)").split("Let me check. ")[1]
    assert tool.pending_code(second) == "print(5)"
    indented = call("    # compute\n    x = 701 / 701 + -8\n    if x < 0:\n        print(x)")
    assert tool.pending_code(indented) == "# compute\nx = 701 / 701 + -8\nif x < 0:\n    print(x)"
    assert tool.pending_code("no call here </python>") is None  # a close without an open
    assert tool.pending_code("<python> print(1)") is None  # not closed yet
    other = PythonTool(call_open="<tool_call>", call_close="</tool_call>")
    assert other.pending_code("x <tool_call>print(7)</tool_call>") == "print(7)"


def test_rewards_see_the_text_without_tool_outputs():
    tool = PythonTool()
    text = (call("print('<answer>99</answer>')") + tool.reply_text(ToolResult("<answer>99</answer>", False))
            + " so the sum is 12 </think> <answer>12</answer>")
    cleaned = tool.without_outputs(text)
    assert "99</answer>\n" not in cleaned and cleaned.count("<answer>") == 2  # the code's and the model's own
    assert cleaned.endswith("<answer>12</answer>") and "<output>" not in cleaned
    assert tool.count_calls(text) == 1
    assert "<python>" in tool.usage and "<output>" in tool.usage


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="timeout_s"):
        PythonTool(timeout_s=0)
    with pytest.raises(ValueError, match="call_close"):
        PythonTool(call_close="")


@needs_sandbox
def test_a_call_returns_what_the_program_printed_or_why_it_failed():
    tool = PythonTool(max_output_chars=64)
    ok = tool.run("print(4817 * 2293)")
    assert ok == ToolResult("11045381", False, ok.duration_s)
    failed = tool.run("x = [1, 2]\nprint('before')\nprint(x[5])")
    assert failed.error and failed.text.startswith("before\n")
    assert failed.text.endswith("IndexError: list index out of range")
    flood = tool.run("print('y' * 100000)")
    assert flood.error and flood.text == "y" * 64 + "... [output cut at 64 characters]"
    long_but_fine = tool.run("print('z' * 100)")
    assert not long_but_fine.error and long_but_fine.text.endswith("[output cut at 64 characters]")
    assert tool.reply_text(ok) == "\n<output>\n11045381\n</output>\n"


@needs_sandbox
def test_a_hanging_call_costs_its_own_timeout_only():
    tool = PythonTool(timeout_s=1.0)
    start = time.perf_counter()
    result = tool.run("while True:\n    pass")
    elapsed = time.perf_counter() - start
    assert result.error and result.text == "TimeoutError: the call ran longer than 1 s"
    assert elapsed < 4.0
    memory = PythonTool(memory_mb=64).run("x = bytearray(512 * 2**20)\nprint(len(x))")
    assert memory.error and "MemoryError" in memory.text and "536870912" not in memory.text


@needs_sandbox
def test_adversarial_programs_through_the_tool_leave_the_host_unharmed(tmp_path, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("R1LAB_TOOL_SECRET", secret)
    target = tmp_path / "written-by-tool"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    tool = PythonTool(timeout_s=3.0)
    attacks = {
        "read the project": f"print(open({str(PROJECT_ROOT / 'pyproject.toml')!r}).read())",
        "read the environment": "import os, glob\nprint(dict(os.environ))\n"
                                "[print(open(p, 'rb').read()) for p in glob.glob('/proc/*/environ')]",
        "write to the host": f"open({str(target)!r}, 'w').write('pwned')\nprint('wrote')",
        "call home": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
                     "print('connected')",
        "kill the caller": f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\nprint('sent')",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
    }
    try:
        results = {name: tool.run(code) for name, code in attacks.items()}
        try:
            conn, _ = listener.accept()
            conn.close()
            called_home = True
        except OSError:
            called_home = False
    finally:
        listener.close()
    assert not called_home and "connected" not in results["call home"].text
    assert not target.exists() and "wrote" not in results["write to the host"].text
    assert secret not in results["read the environment"].text
    assert "[project]" not in results["read the project"].text and results["read the project"].error
    # the caller's pid does not exist in the sandbox's own pid namespace
    killed = results["kill the caller"]
    assert killed.error and killed.text.endswith("ProcessLookupError: [Errno 3] No such process")
    assert results["fork bomb"].error
    assert PythonTool().run("print('still fine')").text == "still fine"  # the caller lives on and can call again


@needs_sandbox
def test_the_hook_answers_with_token_ids_and_enforces_the_call_limit():
    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    tool = PythonTool(max_calls=1)
    hook = tool.hook(tok)
    assert hook.close_text == "</python>"
    first = tok.encode(call("print(6 * 7)"))
    reply = hook.respond(first)
    assert reply is not None and not reply.error and tok.decode(reply.token_ids) == "\n<output>\n42\n</output>\n"
    assert hook.respond(tok.encode("no call at all")) is None
    second = first + reply.token_ids + tok.encode(" again " + call("print(1)").split("Let me check. ")[1])
    refused = hook.respond(second)
    assert refused.error and "call limit (1 per answer)" in tok.decode(refused.token_ids)
