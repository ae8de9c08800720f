"""Tool calls inside a sample (SamplingParams.tool) on CPU: the sequence pauses at the tool's close text, the
reply's ids are appended as they are (tool_mask), and the sample resumes in its own cache, slotted or paged.

Most tests use scripted tools: `detokenize` maps every id that is a multiple of CALL_EVERY to the close text
"#" (so calls come every few tokens of a tiny model) and the reply is a function of the ids so far. The
checks: token_ids are the sampled ids and the replies interleaved exactly where the tool was called (its own
log), the sampled tokens' log-probs equal a no-cache forward over the whole sequence (so the cache was written
right after every resume), a slow tool stalls only its own sample, a raising one costs only its calls,
preemption and batch company change no token, max_new_tokens cuts a reply, and a paused request aborts. One
test runs the real PythonTool in the bubblewrap sandbox.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from test_paged_cache import check_blocks
from test_rollout import VOCAB, _full_logprobs, _prompts

from r1lab.rollout import Engine, SamplingParams
from r1lab.tools import ToolReply

CALL_EVERY = 6
STOPS = list(range(0, VOCAB, 32))  # 1/32 of the vocabulary: lengths vary (96, 192, ... stop rather than call)


def closes_on_multiples(ids: list[int]) -> str:
    """The scripted detokenize: '#' (the close text) for ids that are multiples of CALL_EVERY, '.' otherwise."""
    return "".join("#" if t % CALL_EVERY == 0 else "." for t in ids)


class ScriptedTool:
    """A deterministic fake ToolHook whose reply is a function of the ids so far: 0 to 6 tokens (some of them
    multiples of CALL_EVERY and stop ids, which must neither call nor stop), sometimes an error, sometimes
    None (no call). `log` holds (ids, reply) of every call; `delay` keeps the sample paused a while."""

    close_text = "#"

    def __init__(self, delay: float = 0.0):
        self.delay, self.log, self._lock = delay, [], threading.Lock()

    def respond(self, token_ids):
        h = sum(token_ids) * 31 + len(token_ids)
        reply = None if h % 6 == 0 else ToolReply([(h * 17 + 96 * k) % VOCAB for k in range(h % 7)], h % 3 == 0)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.log.append((tuple(token_ids), reply))
        return reply


def tool_params(tool, **overrides) -> SamplingParams:
    options = dict(temperature=1.0, max_new_tokens=40, n=2, seed=3, stop_token_ids=STOPS, tool=tool,
                   detokenize=closes_on_multiples)
    return SamplingParams(**{**options, **overrides})


def check_trajectory(model, prompt: list[int], c, replies: dict, params: SamplingParams,
                     closes=lambda token: token % CALL_EVERY == 0) -> int:
    """One completion against the tool's log: after every sampled close token (that did not end the sample)
    the tool was called with exactly the ids so far, and its reply's ids follow (cut by max_new_tokens),
    marked in tool_mask, with log-prob 0.0; no other token is marked; tool_calls / tool_errors count the
    replies; the sampled tokens' log-probs equal a no-cache full forward over prompt + every token. Returns
    the number of tool-token spans."""
    ids, mask = c.token_ids, c.tool_mask
    assert len(mask) == len(ids) == len(c.logprobs)
    expected_mask, calls, errors, i = [], 0, 0, 0
    while i < len(ids):
        expected_mask.append(False)  # ids[i] was sampled
        i += 1
        if not closes(ids[i - 1]) or ids[i - 1] in params.stop_token_ids or i == params.max_new_tokens:
            assert tuple(ids[:i]) not in replies
            continue
        reply = replies[tuple(ids[:i])]  # a close token that did not end the sample: the tool was called here
        if reply is None:
            continue
        calls, errors = calls + 1, errors + reply.error
        appended = reply.token_ids[: params.max_new_tokens - i]
        assert ids[i : i + len(appended)] == appended
        expected_mask += [True] * len(appended)
        i += len(appended)
    assert mask == expected_mask
    assert (c.tool_calls, c.tool_errors) == (calls, errors)
    assert all(lp == 0.0 for lp, tool in zip(c.logprobs, mask) if tool)
    full = _full_logprobs(model, prompt, ids)
    sampled = torch.tensor([not m for m in mask])
    torch.testing.assert_close(torch.tensor(c.logprobs)[sampled], full[sampled], atol=1e-4, rtol=0)
    return sum(1 for m, prev in zip(mask, [False] + mask) if m and not prev)



ENGINES = {  # name → Engine options
    "slotted": dict(num_slots=3, max_len=64, lookahead=0),
    "slotted-lookahead": dict(num_slots=3, max_len=64, lookahead=1),
    "slotted-fast": dict(num_slots=3, max_len=64, lookahead=1, fast_decode=True),
    "paged": dict(num_slots=3, max_len=64, paged=True, block_size=4, lookahead=0),
    "paged-lookahead": dict(num_slots=3, max_len=64, paged=True, block_size=4, lookahead=1),
}


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("preset,engine", [("tiny-dense", e) for e in ENGINES]
                         + [("tiny-moe", "slotted"), ("tiny-moe", "paged-lookahead")])
def test_replies_are_interleaved_exactly_and_the_cache_is_right_after_resume(dense, moe, preset, engine):
    """Four prompts × 2 samples through 3 rows (admissions while others are paused), many calls per sample."""
    model = dense if preset == "tiny-dense" else moe
    tool = ScriptedTool()
    prompts = _prompts([5, 9, 2, 13])
    params = tool_params(tool)
    out = Engine(model, **ENGINES[engine]).generate(prompts, params)
    replies = dict(tool.log)
    assert len(replies) == len(tool.log)  # no call was made twice
    spans = [check_trajectory(model, prompts[c.prompt_index], c, replies, params) for c in out]
    assert sum(c.tool_calls for c in out) >= 12 and sum(spans) >= 8 and max(spans) >= 3, spans
    assert {c.finish_reason for c in out} == {"stop", "length"}
    assert any(r is None for r in replies.values()) and any(r and r.error for r in replies.values())


def test_greedy_resume_is_the_full_forward_argmax(dense):
    """Greedy: after every reply the next token is the argmax of a full forward over everything so far."""
    tool = ScriptedTool()
    prompts = _prompts([4, 7])
    params = tool_params(tool, temperature=0.0, n=1, stop_token_ids=[])
    out = Engine(dense, num_slots=2, max_len=64, paged=True, block_size=4).generate(prompts, params)
    for prompt, c in zip(prompts, out):
        assert c.tool_calls >= 2
        with torch.no_grad():
            logits = dense(torch.tensor([prompt + c.token_ids]))[0, len(prompt) - 1 : -1]
        sampled = [i for i, m in enumerate(c.tool_mask) if not m]
        assert [c.token_ids[i] for i in sampled] == logits.argmax(-1)[sampled].tolist()


# ----------------------------------------------------------------------------- the batch goes on
class BlockingTool:
    """Answers its first call only once `release` is set (at most 30 s), with 5 tokens; records the engine's
    decode steps when the call started and when it returned."""

    close_text = "#"

    def __init__(self, engine: Engine):
        self.engine, self.release, self.steps = engine, threading.Event(), []

    def respond(self, token_ids):
        self.steps.append(self.engine.stats.decode_steps)
        released = self.release.wait(timeout=30) if len(self.steps) == 1 else True
        self.steps.append(self.engine.stats.decode_steps)
        return ToolReply([7, 8, 9, 10, 11], error=not released)


@pytest.mark.parametrize("paged", [False, True])
def test_a_slow_tool_stalls_only_its_own_sample(dense, paged):
    """The tool of request 0 (row 0, inside the decode batch) blocks until the two other requests finished 30
    tokens each; then request 0 resumes correctly: its idle row's throwaway K/V were rewritten."""
    engine = Engine(dense, num_slots=4, max_len=64, paged=paged, block_size=4)
    tool = BlockingTool(engine)
    prompts = _prompts([6, 4, 9])
    slow = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=[], seed=1, tool=tool,
                          detokenize=lambda ids: "#" * len(ids))  # the first sampled token calls
    plain = SamplingParams(temperature=1.0, max_new_tokens=30, stop_token_ids=[], seed=2)
    ids = [engine.add_request(prompts[0], slow, keep=True)] + [engine.add_request(p, plain, keep=True)
                                                                for p in prompts[1:]]
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        if not tool.release.is_set() and all(engine.requests[i].unfinished == 0 for i in ids[1:]):
            tool.release.set()
    c = engine.completions(ids[0])[0]
    assert tool.steps[1] - tool.steps[0] >= 29  # the other samples decoded while the call was blocked
    assert c.tool_errors == 0 and c.tool_mask[1:6] == [True] * 5 and c.token_ids[1:6] == [7, 8, 9, 10, 11]
    sampled = torch.tensor([not m for m in c.tool_mask])
    torch.testing.assert_close(torch.tensor(c.logprobs)[sampled],
                               _full_logprobs(dense, prompts[0], c.token_ids)[sampled], atol=1e-4, rtol=0)
    assert time.perf_counter() - start < 20
    engine.close()


class RaisingTool:
    close_text = "#"

    def respond(self, token_ids):
        raise RuntimeError("the tool is broken")


def test_a_raising_tool_costs_only_its_calls(dense, caplog):
    """Every call of request 0 raises: each is an error reply of no tokens, the sample goes on to its length,
    one warning is logged; request 1 (a working tool) gets exactly the tokens it gets alone."""
    prompts = _prompts([5, 8])
    broken = tool_params(RaisingTool(), n=1, stop_token_ids=[])
    working = tool_params(ScriptedTool(), n=1)
    alone = Engine(dense, num_slots=4, max_len=64).generate([prompts[1]], working)[0]
    engine = Engine(dense, num_slots=4, max_len=64)
    with caplog.at_level(logging.WARNING, logger="r1lab.rollout.engine"):
        a = engine.add_request(prompts[0], broken, keep=True)
        b = engine.add_request(prompts[1], working, keep=True, seed=working.seed)
        while engine.has_unfinished():
            engine.step()
    failed, good = engine.completions(a)[0], engine.completions(b)[0]
    closes = sum(t % CALL_EVERY == 0 for t in failed.token_ids[:-1])
    assert failed.finish_reason == "length" and len(failed.token_ids) == 40 and not any(failed.tool_mask)
    assert failed.tool_calls == failed.tool_errors == closes >= 2
    assert sum("tool call raised" in r.message for r in caplog.records) == 1
    assert (good.token_ids, good.tool_mask) == (alone.token_ids, alone.tool_mask)


# ----------------------------------------------------------------------------- scheduling changes no token
@pytest.mark.parametrize("paged", [False, True])
def test_paused_sequences_moved_down_by_compaction_resume_right(dense, paged):
    """Ten short requests fill rows 0-9; the two samples of a tool request sit in rows 10-11 and are paused
    (every sampled token calls, each call takes 30 ms) when the short ones finish, so compaction moves them
    down while paused (slotted: cache rows copied, paged: tables moved); they resume with correct K/V."""
    engine = Engine(dense, num_slots=16, max_len=64, paged=paged, block_size=4)
    moved_while_paused = []
    compact = engine._compact

    def spy():
        before = {s: s.slot for s in engine.slots if s is not None}
        compact()
        moved_while_paused.extend(s in engine.paused for s, slot in before.items() if s.slot != slot)

    engine._compact = spy
    for p in _prompts([4] * 10, seed=2):
        engine.add_request(p, SamplingParams(max_new_tokens=3, stop_token_ids=[]))
    tool, prompt = ScriptedTool(delay=0.03), _prompts([7])[0]
    params = tool_params(tool, max_new_tokens=12, stop_token_ids=[], detokenize=lambda ids: "#" * len(ids))
    rid = engine.add_request(prompt, params, keep=True)
    while engine.has_unfinished():
        engine.step()
    replies = dict(tool.log)
    for c in engine.completions(rid):
        check_trajectory(dense, prompt, c, replies, params, closes=lambda token: True)
    assert any(moved_while_paused), moved_while_paused


@pytest.mark.parametrize("lookahead", [0, 1])
def test_preempting_sequences_with_tool_tokens_changes_no_token(dense, lookahead):
    """A pool of 16 blocks of 4 for 6 rows and a tool that keeps samples paused a few milliseconds: sequences
    are preempted (paused ones too) and re-prefilled with their tool tokens; every token, mask and log-prob
    equals an unconstrained run's, and the block books hold after every step."""
    prompts = _prompts([5, 9, 14, 3, 11])
    reference = Engine(dense, num_slots=16, max_len=64).generate(prompts, tool_params(ScriptedTool()))
    tight = Engine(dense, num_slots=6, max_len=64, paged=True, block_size=4, num_blocks=16, lookahead=lookahead)
    params = tool_params(ScriptedTool(delay=0.003))
    paused_victims = []
    preempt = tight._preempt
    tight._preempt = lambda seq: (paused_victims.append(seq in tight.paused), preempt(seq))
    ids = [tight.add_request(p, params, keep=True, seed=params.seed + i) for i, p in enumerate(prompts)]
    while tight.has_unfinished() or tight.inflight:
        tight.step()
        check_blocks(tight)
    out = [c for rid in ids for c in tight.completions(rid)]
    assert [(c.token_ids, c.tool_mask) for c in out] == [(c.token_ids, c.tool_mask) for c in reference]
    torch.testing.assert_close(torch.tensor(sum((c.logprobs for c in out), [])),
                               torch.tensor(sum((c.logprobs for c in reference), [])), atol=1e-5, rtol=0)
    assert len(paused_victims) >= 5 and any(paused_victims), paused_victims
    assert sum(c.tool_calls for c in out) >= 10 and tight.blocks.num_free == 16


@pytest.mark.parametrize("paged", [False, True])
def test_seeded_samples_with_tools_do_not_depend_on_the_batch(dense, paged):
    """A seeded request with a deterministic tool draws the same tokens alone and beside others (with and
    without tools, queued behind them in fewer rows)."""
    prompt, others = _prompts([7])[0], _prompts([4, 10, 6], seed=1)
    params = tool_params(ScriptedTool(), n=3, seed=21)
    alone = Engine(dense, num_slots=8, max_len=64, paged=paged, block_size=4).generate([prompt], params)
    engine = Engine(dense, num_slots=3, max_len=64, paged=paged, block_size=4, num_blocks=40 if paged else None)
    for i, p in enumerate(others):
        engine.add_request(p, tool_params(ScriptedTool(delay=0.002), n=1, seed=i, max_new_tokens=30,
                                          temperature=0.7) if i != 1 else SamplingParams(max_new_tokens=20))
    rid = engine.add_request(prompt, params, keep=True)
    while engine.has_unfinished():
        engine.step()
    beside = engine.completions(rid)
    assert [(c.token_ids, c.tool_mask) for c in beside] == [(c.token_ids, c.tool_mask) for c in alone]
    assert sum(c.tool_calls for c in alone) >= 3


# ----------------------------------------------------------------------------- limits, streaming, abort
class FixedReplyTool:
    close_text = "#"

    def respond(self, token_ids):
        return ToolReply(list(range(100, 110)), error=False)


@pytest.mark.parametrize("paged", [False, True])
def test_max_new_tokens_cuts_a_reply_and_streaming_marks_tool_tokens(dense, paged):
    """Every sampled token calls, every reply is 10 tokens: with max_new_tokens 15 the second reply is cut to 3
    and the sample ends 'length'. The stream carries the same tokens, tool ones flagged from_tool."""
    engine = Engine(dense, num_slots=2, max_len=64, paged=paged, block_size=4, lookahead=1)
    params = SamplingParams(temperature=1.0, max_new_tokens=15, stop_token_ids=[], seed=5, tool=FixedReplyTool(),
                            detokenize=lambda ids: "#" * len(ids))
    rid = engine.add_request(_prompts([6])[0], params, keep=True)
    streamed, flags, last = [], [], None
    while engine.has_unfinished() or engine.inflight:
        for ev in engine.step():
            assert last is None  # nothing after the finishing event
            streamed += ev.new_token_ids
            flags += [ev.from_tool] * len(ev.new_token_ids)
            assert ev.from_tool or ev.new_logprobs[0] < 0
            if ev.finished:
                last = ev
    c = engine.completions(rid)[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 15 and c.tool_calls == 2
    assert c.tool_mask == [False] + [True] * 10 + [False] + [True] * 3
    assert c.token_ids[1:11] == list(range(100, 110)) and c.token_ids[12:] == [100, 101, 102]
    assert streamed == c.token_ids and flags == c.tool_mask
    assert last.finish_reason == "length" and last.from_tool and last.new_token_ids == [100, 101, 102]


@pytest.mark.parametrize("paged", [False, True])
def test_aborting_a_paused_request_drops_its_reply(dense, paged):
    engine = Engine(dense, num_slots=4, max_len=64, paged=paged, block_size=4)
    tool = BlockingTool(engine)
    slow = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=[], tool=tool,
                          detokenize=lambda ids: "#" * len(ids))
    plain = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=[])
    victim = engine.add_request(_prompts([5])[0], slow, keep=True)
    other = engine.add_request(_prompts([3])[0], plain, keep=True)
    while not engine.paused:
        engine.step()
    engine.abort(victim)
    assert not engine.paused and engine.running == 1
    tool.release.set()
    while engine.has_unfinished() or engine.inflight:
        engine.step()
    time.sleep(0.05)  # the dropped call returns meanwhile: nothing may pick it up
    engine.step()
    aborted = engine.completions(victim)[0]
    assert aborted.finish_reason == "abort" and len(aborted.token_ids) == 1 and not any(aborted.tool_mask)
    assert engine.completions(other)[0].finish_reason == "length"
    assert not engine.has_unfinished() and engine.running == 0
    if paged:
        assert engine.blocks.in_use == 0
    engine.close()


def test_params_without_detokenize_are_refused():
    with pytest.raises(ValueError, match="^SamplingParams.tool needs detokenize"):
        SamplingParams(tool=ScriptedTool())


def test_no_tool_means_an_all_false_mask(dense):
    out = Engine(dense, num_slots=2, max_len=32).generate(_prompts([3]), SamplingParams(max_new_tokens=5))
    assert out[0].tool_mask == [False] * len(out[0].token_ids) and out[0].tool_calls == 0


# ----------------------------------------------------------------------------- the real python tool
def test_the_python_tool_runs_in_the_sandbox_mid_sample(tmp_path):
    """A random checkpoint's seeded text drives the real PythonTool: its call_open / call_close are chosen as
    the two characters before, and the new characters of, the k-th generated token, so the call closes there
    with empty code. The sandbox runs it; the reply's ids, as the hook encoded them, follow token k, and the
    sample resumes with correct log-probs."""
    from r1lab.model import load_model_and_tokenizer
    from r1lab.sandbox import SandboxUnavailable
    from r1lab.testing import build_random_checkpoint
    from r1lab.tools import PythonTool

    model, tok = load_model_and_tokenizer(build_random_checkpoint(tmp_path / "m", seed=3))
    prompt = tok.encode("What is 2 + 3?")
    sampling = dict(temperature=1.0, seed=0, stop_token_ids=[tok.eos_id])
    free = Engine(model, num_slots=1, max_len=256).generate([prompt], SamplingParams(max_new_tokens=40, **sampling))[0]
    text_at = [tok.decode(free.token_ids[:k], skip_special_tokens=True) for k in range(len(free.token_ids) + 1)]

    def closes_only_at_the_end(k: int) -> bool:
        before, now = text_at[k - 1], text_at[k]
        return len(before) >= 2 and now.startswith(before) and len(now) > len(before) and now.find(
            now[len(before):]) == len(before)

    k = next(k for k in range(3, len(text_at)) if closes_only_at_the_end(k))
    python = PythonTool(call_open=text_at[k - 1][-2:], call_close=text_at[k][len(text_at[k - 1]):], timeout_s=10)
    try:
        hook = python.hook(tok)
    except SandboxUnavailable as exc:
        pytest.skip(f"no sandbox: {exc}")
    result = python.run("")
    assert not result.error and result.text == ""
    reply = tok.encode(python.reply_text(result))
    params = SamplingParams(max_new_tokens=k + len(reply) + 4, tool=hook,
                            detokenize=lambda ids: tok.decode(ids, skip_special_tokens=True), **sampling)
    c = Engine(model, num_slots=2, max_len=256).generate([prompt], params)[0]
    assert c.token_ids[:k] == free.token_ids[:k]
    assert c.token_ids[k : k + len(reply)] == reply and c.tool_mask[k : k + len(reply)] == [True] * len(reply)
    assert not any(c.tool_mask[:k]) and c.tool_calls >= 1 and "<output>" in tok.decode(c.token_ids)
    sampled = torch.tensor([not m for m in c.tool_mask])
    torch.testing.assert_close(torch.tensor(c.logprobs)[sampled],
                               _full_logprobs(model, prompt, c.token_ids)[sampled], atol=1e-4, rtol=0)
