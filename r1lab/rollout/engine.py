"""The generation engine: slotted or paged KV cache, batched prefill, continuous-batching decode, sampling.

Life of a sample ("sequence"):
1. `add_request` queues the prompt's n sequences.
2. Admission gives a waiting sequence a free cache slot. The first sequence of a prompt is prefilled: the
   K/V of prompt[:-1] are written into its slot (right-padded batches of several prompts, chunked when
   long; no logits are computed). Its siblings instead copy that slot's first len-1 cache rows (or those of
   any running sibling) into their own slots: a tensor copy instead of a second prefill.
3. Decode steps run over cache rows 0..B-1 (row b = slot b, a view, no gather), every sequence feeding
   its next token at its own position; the prompt's last token is the first fed, so every sample draws its
   first token from the same logits. Slots that hold no running sequence are idle dummy rows.
4. A sampled stop token or max_new_tokens finishes a sequence and frees its slot; the next step admits
   a waiting one into it. When few sequences remain in high slots they are moved down (cache rows copied)
   so the decode batch shrinks.
5. Tools (SamplingParams.tool): a sampled token that completes the tool's close_text pauses its sequence.
   It keeps its slot (and blocks) but sits out the decode steps while `respond` runs on the engine's worker
   threads; the other sequences keep decoding. A paused row below the batch's top is an idle row, so its
   cache positions from the pause on (the last sampled token's, p, and later ones) get throwaway K/V. The
   step that finds the reply appends its ids to the sequence (tool_mask; they count against
   max_new_tokens), prefills [last sampled token] + reply[:-1] at positions p... into the sequence's own
   cache (which rewrites everything the idle row wrote that is ever read), and feeds reply[-1] next. The
   history is never re-tokenized: token_ids are the sampled ids and the reply ids, interleaved.

Paged mode (`paged=True`, model/cache.PagedKVCache): a decode row holds a list of fixed-size blocks from one
pool (blocks.BlockManager keeps the free list and reference counts) instead of a slot of max_len positions,
so memory goes to the tokens that exist rather than to max_len per row. What changes in the steps above:
- admission also needs free blocks: the blocks of the sequence's context plus one more while others run
  (the first sequence admitted into an empty engine needs no headroom, so it always fits);
- siblings share the prompt's full blocks (reference counts; nobody writes them again) and copy only the
  partial last one (copy-on-write: each sample writes its own tokens there);
- before each decode step, a sequence whose next position starts a new block gets one; when none is free
  the most recently admitted sequences are preempted: their blocks and rows are freed and they go back to
  the front of the waiting queue with their tokens, to be prefilled again (prompt + generated[:-1]) when
  re-admitted. Noise is keyed by position, so a preempted sequence draws exactly the tokens it would have;
- compaction moves block-table rows, not K/V;
- a paused sequence (step 5) never gets a new block while paused; a resumed one first gets the blocks its
  reply needs (preempting as above). A paused sequence may be preempted like any other: it then waits for
  its reply outside the queue, and joins the queue's front with the reply appended, to be prefilled again
  (prompt + everything generated, tool tokens included).

Host syncs: one small device→host copy of the sampled tokens and log-probs per step. With `lookahead=1`
(default on CUDA) step t+1 is launched before step t's tokens are read, so the GPU never waits on Python;
a sequence that finished, paused or was preempted at step t then computes one wasted row in step t+1,
which is discarded (a paused or preempted sequence's launched rows are dropped when it leaves the batch:
it draws that position again when it resumes, with the same noise, see below).

Reproducibility: every sequence carries a noise key, derived from its request's seed and its sample index
(`noise_key`); the noise of a draw is a function of that key and the position being sampled only
(sampling.uniform_noise). So a seeded request gives the same tokens whatever else runs beside it, in
whichever slot, at any batch size (and generate() gives prompt i the seed params.seed + i, so evaluation
cut into batches or across ranks at global indices draws the same samples). Unseeded requests take a seed
from the engine's generator (`Engine.seed`). Same device and software are still needed: CPU and GPU draw
differently, and a batched forward's rounding can differ from another batch size's.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from r1lab.model import KVCache
from r1lab.model.cache import PagedKVCache

from . import fused_sampling
from .blocks import BlockManager
from .cuda_graphs import DecodeGraphs, batch_bucket, kv_bucket
from .fast_decode import FastDecoder, supported as fast_decode_supported, triton as _triton
from .sampling import RowParams, SamplingParams, device_tensor, sample

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05
"""Longest a step waits for a tool reply when every sequence it could decode is paused (no busy loop, and a
server's step() loop still returns to take new requests)."""


@dataclass
class Completion:
    prompt_index: int
    """Index of the prompt in the list given to generate (request id for Engine.completions)."""
    sample_index: int
    """0..n-1 among the samples of that prompt."""
    token_ids: list[int]
    """Generated tokens (sampled ones and tool replies' ones, in order); a sampled stop token is included as
    the last one."""
    logprobs: list[float]
    """log_softmax of the raw logits (temperature 1, no top-k/top-p) at each generated token: GRPO's π_old.
    0.0 at tool tokens (placeholders: they were not sampled)."""
    finish_reason: str
    """'stop' (a stop token was sampled or a stop string generated), 'length' (max_new_tokens reached, tool
    tokens included) or 'abort'."""
    tool_mask: list[bool] | None = None
    """Per token of token_ids: True where it came from a tool reply (not trained), False where it was sampled.
    None when constructed is filled with all False."""
    tool_calls: int = 0
    """Tool calls answered (a `respond` that returned None made no call)."""
    tool_errors: int = 0
    """Of those, the ones whose reply said error, or whose `respond` raised."""

    def __post_init__(self) -> None:
        if self.tool_mask is None:
            self.tool_mask = [False] * len(self.token_ids)


@dataclass
class StreamEvent:
    request_id: int
    sample_index: int
    new_token_ids: list[int]
    new_logprobs: list[float]
    finished: bool
    finish_reason: str | None
    from_tool: bool = False
    """new_token_ids are a tool reply's (log-probs 0.0), not sampled."""


@dataclass
class EngineStats:
    decode_steps: int = 0
    decode_rows: int = 0
    """Sum over steps of the decode batch (idle dummy rows included)."""
    prefill_forwards: int = 0
    prefill_tokens: int = 0
    """Tokens actually prefilled: prompts (siblings that copied a slot are not counted), the histories of
    re-admitted preempted sequences, and tool replies."""
    slot_copies: int = 0
    """Sibling prefills replaced by a cache copy."""
    compaction_moves: int = 0
    blocks_in_use: int = 0
    """Paged mode: KV blocks held right now (a block shared by siblings counts once)."""
    peak_blocks: int = 0
    preemptions: int = 0
    """Paged mode: sequences sent back to the waiting queue because no block was free."""
    shared_prompt_blocks: int = 0
    """Paged mode: block allocations saved by siblings sharing a prompt's full blocks."""


@dataclass(eq=False)
class _Sequence:
    request: "_Request"
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    slot: int = -1
    """Decode row (cache slot) while running, else -1."""
    blocks: list[int] = field(default_factory=list)
    """Paged mode: physical KV blocks of logical blocks 0, 1, ... while running."""
    admitted_at: int = 0
    """Admission order (the most recently admitted sequence is preempted first)."""
    fed: int = 0
    """Cache positions written (or being written by a launched step); the next position fed."""
    noise_key: int = 0
    """The sampling noise's key (see noise_key()); the draw at position p uses noise_key ^ (p << 44)."""
    finish_reason: str | None = None
    tool_spans: list[tuple[int, int]] = field(default_factory=list)
    """(start, length) in token_ids of each tool reply appended."""
    tool_calls: int = 0
    tool_errors: int = 0
    text_from: int = 0
    """Stop strings and the tool's close_text are looked for in token_ids[text_from:]: what the model wrote
    since its last pause (a reply's text, or a close_text already answered, must not count again)."""

    def context(self) -> list[int]:
        """Prompt + generated tokens (those generated before a preemption, when re-admitted)."""
        return self.request.prompt + self.token_ids


@dataclass(eq=False)
class _Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    keep: bool
    """Keep the finished request until completions() collects it."""
    sequences: list[_Sequence] = field(default_factory=list)
    unfinished: int = 0


@dataclass
class _Launched:
    """A decode step whose sampled tokens have not been read yet."""
    rows: list[tuple[int, _Sequence]]
    """(row, sequence) of the rows whose token is wanted (a sequence that paused or was preempted since is
    taken out: its row was wasted)."""
    tokens: torch.Tensor
    logprobs: torch.Tensor
    event: torch.cuda.Event | None


class Engine:
    """Continuous-batching generation over one model and one KV cache.

    Cache size: `num_slots` × `max_len` positions. Give both, or `kv_cache_bytes` with one of them (the other
    is derived); with neither, max_len = min(model max positions, 4096) and the slots fill half the free
    GPU memory (at most 512), or 16 slots on CPU.
    paged=True: a PagedKVCache of `num_blocks` blocks of `block_size` positions (default: `kv_cache_bytes`,
    else half the free GPU memory, or on CPU as many positions as the slotted default); `num_slots` is then
    the most sequences decoded at once (default 256 on CUDA, 16 on CPU) and `max_len` only bounds one
    sequence (default: the model's max positions).
    prefill_tokens: padded tokens per prefill forward; prefill_chunk: longest piece of one prompt per forward.
    cuda_graphs: capture the decode step (CUDA only; default on). lookahead: 0 or 1 (default 1 on CUDA).
    fast_decode: decode dense GQA models with fused kernels (fast_decode.py; default on CUDA with Triton;
    True on CPU runs the same structure with plain torch ops, for tests).
    fused_proj, decode_attention: options of the fast decode path (fast_decode.FastDecoder; None = the module
    defaults: fused q|k|v and gate|up GEMMs, and the valid-length attention kernel on CUDA). The fused weights
    are copies the engine refreshes from the model by itself (when a batch starts, and when a parameter's
    version counter moved), so in-place training updates need no call.
    tool_workers: threads that run tool calls (SamplingParams.tool; created at the first call; default: the
    ThreadPoolExecutor default). `close()` stops them.
    """

    def __init__(self, model, *, num_slots: int | None = None, max_len: int | None = None,
                 kv_cache_bytes: int | None = None, cache_dtype: torch.dtype | None = None,
                 prefill_tokens: int | None = None, prefill_chunk: int | None = None,
                 cuda_graphs: bool | None = None, lookahead: int | None = None, fast_decode: bool | None = None,
                 fused_proj: bool | None = None, decode_attention: bool | None = None, paged: bool = False,
                 block_size: int = 16, num_blocks: int | None = None, tool_workers: int | None = None):
        self.model, self.args = model, model.args
        self.options: dict = {}  # what generate() built this engine with (it reuses it for the same options)
        weight = model.lm_head.weight
        self.device, dtype = weight.device, cache_dtype or weight.dtype
        cuda = self.device.type == "cuda"
        if paged:
            num_slots = num_slots or (256 if cuda else 16)
            max_len = max_len or self.args.max_position_embeddings
            num_blocks = self._pool_size(num_blocks, kv_cache_bytes, block_size, num_slots, max_len, dtype, cuda)
        else:
            num_slots, max_len = self._cache_shape(num_slots, max_len, kv_cache_bytes, dtype, cuda)
        self.num_slots, self.max_len = num_slots, max_len
        self.prefill_tokens = prefill_tokens or (16384 if cuda else 2048)
        self.prefill_chunk = min(prefill_chunk or 2048, self.prefill_tokens)
        self.lookahead = (1 if cuda else 0) if lookahead is None else lookahead
        with torch.inference_mode():
            if paged:
                self.cache = PagedKVCache(self.args, num_slots, num_blocks, block_size, max_len, dtype, self.device)
            else:
                self.cache = KVCache(self.args, num_slots, max_len, dtype, self.device)
            self.tokens = torch.zeros(num_slots, dtype=torch.long, device=self.device)  # next input per slot
            self.positions = torch.zeros(num_slots, dtype=torch.long, device=self.device)
            self.noise_keys = torch.zeros(num_slots, dtype=torch.long, device=self.device)  # per slot
        self.blocks = BlockManager(num_blocks) if paged else None
        self.seed_generator = torch.Generator().manual_seed(0)  # seeds of unseeded requests
        if fast_decode is None:
            fast_decode = cuda and _triton is not None
        use_fast = fast_decode and fast_decode_supported(model)
        self.fast = FastDecoder(model, self.cache, use_triton=cuda, fused_proj=fused_proj,
                                decode_attention=decode_attention) if use_fast else None
        use_graphs = cuda if cuda_graphs is None else cuda_graphs and cuda
        self.graphs = DecodeGraphs(self._decode_into, num_slots, self.args.vocab_size, weight.dtype,
                                   self.device) if use_graphs else None
        self.slots: list[_Sequence | None] = [None] * num_slots
        self.free_slots = list(range(num_slots))  # a min-heap: the lowest free slot is taken first
        self.waiting: deque[_Sequence] = deque()
        self.requests: dict[int, _Request] = {}
        self.inflight: deque[_Launched] = deque()
        self.running = 0  # sequences holding a slot (paused ones included)
        self.paused: dict[_Sequence, Future] = {}  # sequences waiting for their tool call, in pause order
        self._tool_workers, self._tool_pool = tool_workers, None
        self._tool_failure_logged = False
        self._decoded = False  # the last step launched a decode step
        self._admissions = 0
        self.unfinished = 0  # sequences not finished (waiting, running or paused)
        self.stats = EngineStats()
        self._next_request_id = 0
        self._row_params: RowParams | None = None  # rebuilt when the batch composition changes
        self._running_params: dict[int, int] = {}  # id(SamplingParams) → running sequences using it
        self._uniform_params: dict[tuple[int, int], tuple[SamplingParams, RowParams]] = {}
        self._restore_training = False

    def _cache_shape(self, num_slots, max_len, budget, dtype, cuda) -> tuple[int, int]:
        per_token = KVCache.bytes_per_token(self.args, dtype)
        if num_slots and max_len:
            return num_slots, max_len
        if max_len is None and num_slots and budget:
            max_len = budget // (num_slots * per_token)
            if max_len < 1:
                raise ValueError(f"a KV cache budget of {budget} bytes cannot hold {num_slots} slots")
            return num_slots, max_len
        max_len = max_len or min(self.args.max_position_embeddings, 4096)
        if budget is None:
            if not cuda:
                return num_slots or 16, max_len
            budget = torch.cuda.mem_get_info(self.device)[0] // 2
        num_slots = num_slots or min(512, budget // (max_len * per_token))
        if num_slots < 1:
            raise ValueError(f"a KV cache budget of {budget} bytes cannot hold one sequence of {max_len} positions")
        return num_slots, max_len

    def _pool_size(self, num_blocks, budget, block_size, num_rows, max_len, dtype, cuda) -> int:
        if num_blocks:
            return num_blocks
        if budget is None:
            if not cuda:
                return num_rows * -(-min(max_len, 4096) // block_size)
            budget = torch.cuda.mem_get_info(self.device)[0] // 2
        num_blocks = budget // PagedKVCache.bytes_per_block(self.args, block_size, dtype) - 1  # - the scratch block
        if num_blocks < 1:
            raise ValueError(f"a KV cache budget of {budget} bytes cannot hold one block of {block_size} positions")
        return num_blocks

    def _blocks_for(self, positions: int) -> int:
        """Blocks that hold cache positions 0..positions-1."""
        return -(-positions // self.cache.block_size)

    # ------------------------------------------------------------------ public interface
    def add_request(self, prompt: list[int], params: SamplingParams, keep: bool = False,
                    seed: int | None = None) -> int:
        """Queue params.n samples of `prompt`; returns the request id used in StreamEvents.

        keep=False: the engine forgets the request once all its samples finished (a streaming consumer has
        everything from the events); keep=True: it stays until `completions(request_id)` collects it.
        seed: the request's sampling seed (None = params.seed; if that is None too, one from Engine.seed's
        generator)."""
        prompt = [int(t) for t in prompt]
        self._check_prompt(prompt, params, "prompt")
        seed = params.seed if seed is None else seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.seed_generator))
        stop = self.args.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids
        request = _Request(self._next_request_id, prompt, params, frozenset(stop), keep)
        self._next_request_id += 1
        request.sequences = [_Sequence(request, i, noise_key=noise_key(seed, i)) for i in range(params.n)]
        self.requests[request.request_id] = request
        if params.max_new_tokens == 0:
            for seq in request.sequences:
                seq.finish_reason = "length"
        else:
            request.unfinished = params.n
            self.unfinished += params.n
            self.waiting.extend(request.sequences)
        return request.request_id

    def step(self) -> list[StreamEvent]:
        """Admit waiting sequences, launch one decode step, return the tokens that became known."""
        return self._step(emit=True)

    def has_unfinished(self) -> bool:
        return self.unfinished > 0

    def abort(self, request_id: int) -> None:
        """Stop every sample of a request now (finish_reason 'abort'); its slots are freed, and the reply of
        a paused sample's tool call is dropped when it comes. Unknown or already finished and forgotten
        requests are ignored."""
        request = self.requests.get(request_id)
        if request is None:
            return
        with torch.inference_mode():  # paged: freeing rows writes the (inference-mode) block tables
            for seq in request.sequences:
                if seq.finish_reason is None:
                    self._finish(seq, "abort")

    def completions(self, request_id: int, forget: bool = True) -> list[Completion]:
        """The n completions of a finished request (forget=True drops the engine's record of it)."""
        request = self.requests.pop(request_id) if forget else self.requests[request_id]
        return [Completion(request_id, s.sample_index, s.token_ids, s.logprobs, s.finish_reason or "abort",
                           _tool_mask(len(s.token_ids), s.tool_spans), s.tool_calls, s.tool_errors)
                for s in request.sequences]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """len(prompts) * n completions, prompt-major; prompt_index is the position in `prompts`. With
        params.seed, prompt i is sampled as a request with seed params.seed + i."""
        for i, prompt in enumerate(prompts):
            self._check_prompt(list(prompt), params, f"prompt {i}")
        ids = [self.add_request(p, params, keep=True, seed=None if params.seed is None else params.seed + i)
               for i, p in enumerate(prompts)]
        while self.unfinished:
            self._step(emit=False)
        while self.inflight:  # a wasted lookahead step may still be in flight
            self._step(emit=False)
        out = []
        for index, request_id in enumerate(ids):
            for c in self.completions(request_id):
                c.prompt_index = index
                out.append(c)
        return out

    def seed(self, seed: int) -> None:
        """Seed the generator that gives unseeded requests their seeds (one draw per request, in order)."""
        self.seed_generator.manual_seed(seed)

    def close(self) -> None:
        """Stop the tool worker threads once they are idle (calls in progress still finish; a later call
        starts new threads)."""
        if self._tool_pool is not None:
            self._tool_pool.shutdown(wait=False)
            self._tool_pool = None

    def reset_graphs(self) -> None:
        """Forget captured graphs (needed only if the model's parameter tensors were replaced)."""
        if self.graphs is not None:
            self.graphs.clear()

    # ------------------------------------------------------------------ validation
    def _check_prompt(self, prompt: list[int], params: SamplingParams, name: str) -> None:
        if not prompt:
            raise ValueError(f"{name} is empty: a prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= self.args.vocab_size:
            raise ValueError(f"{name} has token ids outside [0, {self.args.vocab_size})")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ValueError(
                f"{name} has {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} = "
                f"{len(prompt) + params.max_new_tokens} positions, more than the KV cache's {self.max_len} per "
                "sequence; shorten it, lower max_new_tokens, or build the Engine with a larger max_len")
        if self.blocks is not None:
            # the last position a sequence can write: the one after its last token (a wasted lookahead row)
            need = self._blocks_for(len(prompt) + params.max_new_tokens)
            if need > self.blocks.num_blocks:
                raise ValueError(
                    f"{name} has {len(prompt)} tokens + max_new_tokens {params.max_new_tokens}: {need} KV blocks of "
                    f"{self.cache.block_size} positions, more than the pool's {self.blocks.num_blocks}; shorten it, "
                    "lower max_new_tokens, or build the Engine with more num_blocks / kv_cache_bytes")

    # ------------------------------------------------------------------ the step
    def _step(self, emit: bool) -> list[StreamEvent]:
        if self.model.training:  # MoE layers count expert loads in training mode: keep them out of rollouts
            self.model.eval()
            self._restore_training = True
        with torch.inference_mode():
            events: list[StreamEvent] = []
            if self.paused:  # resume the sequences whose tool replied (waiting a little when nothing else runs)
                self._resume_answered(events if emit else None, wait_for_one=not self._decoded and not self.inflight)
            if self.fast is not None and not self.running and self.waiting:
                self.fast.sync_weights(force=True)  # a batch starts: the trainer may have changed the weights
            if self.blocks is not None:
                self._grow_blocks()  # before admission: running sequences get the free blocks first
            self._admit()
            self._compact()
            rows = self._decode_rows()
            self._decoded = bool(rows)
            if rows:
                self._launch_decode(rows)
            while self.inflight and (len(self.inflight) > self.lookahead or not rows):
                self._process(self.inflight.popleft(), events if emit else None)
            if self.blocks is not None:
                self.stats.blocks_in_use, self.stats.peak_blocks = self.blocks.in_use, self.blocks.peak
        if self._restore_training and not self.has_unfinished() and not self.inflight:
            self.model.train()
            self._restore_training = False
        return events

    def _admit(self) -> None:
        """Give waiting sequences (in queue order) a free row, and in paged mode the blocks their context needs;
        then fill their cache: a prefill, or a copy of a sibling's prompt K/V and a prefill of the rest."""
        admitted: list[_Sequence] = []
        donors: dict[int, _Sequence] = {}  # request id → a sibling whose cache holds (or is about to) the prompt
        prefill, prefill_after_copy, copies = [], [], []
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            req = seq.request
            # a running sibling's first len-1 positions are the prompt's K/V (it only writes past them)
            donor = donors.get(req.request_id) or next(
                (s for s in req.sequences if s.slot >= 0 and s.finish_reason is None), None)
            headroom = 1 if self.running or admitted else 0  # an empty engine admits anything that fits the pool
            if self.blocks is not None and not self._take_blocks(seq, donor, headroom):
                break
            self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            self.slots[seq.slot] = seq
            self._admissions += 1
            seq.admitted_at = self._admissions
            admitted.append(seq)
            # later siblings in this round copy from the same donor, never from one whose copy is still pending
            donors[req.request_id] = donor or seq
            if donor is None:
                start = 0
            else:
                copies.append((donor, seq))
                start = len(req.prompt) - 1
            context = seq.context()
            if start < len(context) - 1:  # K/V of context[:-1] still missing (a whole prompt, or preempted tokens)
                (prefill if donor is None else prefill_after_copy).append([seq.slot, context[:-1], start])
        if not admitted:
            return
        if self.blocks is not None:
            self.cache.set_rows([s.slot for s in admitted], [s.blocks for s in admitted])
        self._prefill(prefill)
        self._copy_prompts(copies)
        self._prefill(prefill_after_copy)
        # every admitted sequence feeds the last token of its context next (the prompt's, unless preempted)
        slots = [s.slot for s in admitted]
        last = [s.context()[-1] for s in admitted]
        pos = [len(s.request.prompt) + len(s.token_ids) - 1 for s in admitted]
        index = device_tensor(slots, torch.long, self.device)
        self.tokens[index] = device_tensor(last, torch.long, self.device)
        self.positions[index] = device_tensor(pos, torch.long, self.device)
        self.noise_keys[index] = device_tensor([s.noise_key for s in admitted], torch.long, self.device)
        for seq, p in zip(admitted, pos):
            seq.fed = p
            key = id(seq.request.params)
            self._running_params[key] = self._running_params.get(key, 0) + 1
        self.running += len(admitted)
        self._row_params = None

    def _take_blocks(self, seq: _Sequence, donor: _Sequence | None, headroom: int) -> bool:
        """Paged: give `seq` the blocks of its context (sharing the donor's full prompt blocks) if they and
        `headroom` more are free; False (nothing taken) otherwise."""
        shared = (len(seq.request.prompt) - 1) // self.cache.block_size if donor is not None else 0
        need = self._blocks_for(len(seq.request.prompt) + len(seq.token_ids)) - shared
        if self.blocks.num_free < need + headroom:
            return False
        seq.blocks = (self.blocks.fork(donor.blocks[:shared]) if shared else []) + self.blocks.allocate(need)
        self.stats.shared_prompt_blocks += shared
        return True

    def _copy_prompts(self, pairs: list[tuple[_Sequence, _Sequence]]) -> None:
        """Give each (donor, sibling) pair's sibling the prompt[:-1] K/V of the donor: slotted, a copy of the
        slot's first positions; paged, a copy of the partial last prompt block (the full ones are shared)."""
        if not pairs:
            return
        self.stats.slot_copies += len(pairs)
        if self.blocks is None:
            length = max(len(dst.request.prompt) - 1 for _, dst in pairs)
            if length > 0:
                self.cache.copy_slots(device_tensor([s.slot for s, _ in pairs], torch.long, self.device),
                                      device_tensor([d.slot for _, d in pairs], torch.long, self.device), length)
            return
        size = self.cache.block_size
        partial = [(src.blocks[i], dst.blocks[i]) for src, dst in pairs
                   for i in [(len(dst.request.prompt) - 1) // size] if (len(dst.request.prompt) - 1) % size]
        if partial:
            self.cache.copy_blocks(device_tensor([s for s, _ in partial], torch.long, self.device),
                                   device_tensor([d for _, d in partial], torch.long, self.device))

    def _prefill(self, work: list[list]) -> None:
        """Write K/V into the cache for each [slot, tokens, start]: tokens[start:] at positions start...;
        right-padded batches, long pieces chunked."""
        while work:
            batch, width = [], 0
            for item in work:
                piece = min(len(item[1]) - item[2], self.prefill_chunk)
                if batch and (len(batch) + 1) * max(width, piece) > self.prefill_tokens:
                    break
                batch.append(item)
                width = max(width, piece)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            positions = torch.empty(len(batch), width, dtype=torch.long)
            kv_len = 0
            for row, (slot, tokens, start) in enumerate(batch):
                piece = min(len(tokens) - start, width)
                ids[row, :piece] = torch.tensor(tokens[start : start + piece])
                # padding continues the positions (stale entries past the end are harmless); clamped into
                # the cache, where it can't hit a real prompt position (those end at max_len - 2 at most)
                positions[row] = torch.arange(start, start + width).clamp_(max=self.max_len - 1)
                kv_len = max(kv_len, start + piece)
            slot_ids = [item[0] for item in batch]
            self.model.forward_hidden(self._upload(ids), self._upload(positions), cache=self.cache,
                                      slot_ids=device_tensor(slot_ids, torch.long, self.device), kv_len=kv_len)
            self.stats.prefill_forwards += 1
            for item in batch:
                done = min(len(item[1]) - item[2], width)
                item[2] += done
                self.stats.prefill_tokens += done
            work = [item for item in work if item[2] < len(item[1])]

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _compact(self) -> None:
        """Move sequences from the highest slots into the lowest free ones when that shrinks the batch bucket."""
        if not self.running:
            return
        top = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        target = batch_bucket(self.running)
        if batch_bucket(top) <= target:
            return
        moves = []
        for slot in range(top - 1, target - 1, -1):
            seq = self.slots[slot]
            if seq is None:
                continue
            new = heapq.heappop(self.free_slots)
            moves.append((slot, new, seq))
        src = device_tensor([m[0] for m in moves], torch.long, self.device)
        dst = device_tensor([m[1] for m in moves], torch.long, self.device)
        if self.blocks is not None:
            self.cache.move_rows(src, dst)
        else:
            self.cache.copy_slots(src, dst, max(m[2].fed for m in moves))
        self.tokens[dst] = self.tokens[src]
        self.positions[dst] = self.positions[src]
        self.noise_keys[dst] = self.noise_keys[src]
        for old, new, seq in moves:
            self.slots[old], self.slots[new], seq.slot = None, seq, new
            heapq.heappush(self.free_slots, old)
        self.stats.compaction_moves += len(moves)
        self._row_params = None

    def _decode_rows(self) -> list[tuple[int, _Sequence]]:
        """(row, sequence) of every sequence that takes part in the next decode step."""
        rows = [(i, s) for i, s in enumerate(self.slots) if s is not None]
        if self.paused:  # paused sequences keep their rows (and cache) but are not decoded
            rows = [(i, s) for i, s in rows if s not in self.paused]
        return rows

    def _launch_decode(self, rows: list[tuple[int, _Sequence]]) -> None:
        batch = rows[-1][0] + 1
        kv_len = min(max(s.fed for _, s in rows) + 1, self.max_len)
        if self.fast is not None:
            self.fast.sync_weights()  # only if a parameter was written in place while requests ran
        logits = None
        if self.graphs is not None:
            batch, kv_len = batch_bucket(batch), kv_bucket(kv_len, self.max_len)
            batch = min(batch, self.num_slots)
            logits = self.graphs.run(batch, kv_len)
        if logits is None:
            logits = self._decode_logits(batch, kv_len)
        rp = self._row_params_for(rows, batch)
        # the noise key of a draw: the sequence's key and the position it samples after (positions < 2**18)
        keys = self.noise_keys[:batch] ^ (self.positions[:batch] << 44)
        if rp.plain and fused_sampling.available(logits):
            tokens, logprobs = fused_sampling.gumbel_max_sample(logits, rp.temperature_or_zero, keys)
        else:
            tokens, logprobs = sample(logits, rp, keys)
        self.tokens[:batch] = tokens
        self.positions[:batch] = (self.positions[:batch] + 1).clamp_(max=self.max_len - 1)
        event = None
        if self.device.type == "cuda":  # async copy into pinned memory; _process waits on the event
            tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True).copy_(tokens, non_blocking=True)
            logprobs = torch.empty(logprobs.shape, pin_memory=True).copy_(logprobs, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.inflight.append(_Launched(rows, tokens, logprobs, event))
        for _, s in rows:
            s.fed += 1
        self.stats.decode_steps += 1
        self.stats.decode_rows += batch

    def _row_params_for(self, rows: list[tuple[int, _Sequence]], batch: int) -> RowParams:
        """Per-row sampling settings; when every running sequence shares one SamplingParams (generate()) they
        are cached per batch size, so composition changes cost nothing."""
        if len(self._running_params) == 1:
            params = rows[0][1].request.params
            key = (id(params), batch)
            if key not in self._uniform_params:
                if len(self._uniform_params) > 64:
                    self._uniform_params.clear()
                self._uniform_params[key] = (params, RowParams([params] * batch, self.args.vocab_size, self.device))
            return self._uniform_params[key][1]
        if self._row_params is None or self._row_params.batch != batch:
            per_row: list[SamplingParams | None] = [None] * batch
            for i, s in rows:
                per_row[i] = s.request.params
            self._row_params = RowParams(per_row, self.args.vocab_size, self.device)
        return self._row_params

    def _decode_logits(self, batch: int, kv_len: int) -> torch.Tensor:
        """Eager decode step over cache rows 0..batch-1 → logits [batch, V]."""
        if self.fast is not None:
            out = torch.empty(batch, self.args.vocab_size, dtype=self.model.lm_head.weight.dtype, device=self.device)
            self.fast(self.tokens[:batch], self.positions[:batch], kv_len, out)
            return out
        return self.model(self.tokens[:batch, None], self.positions[:batch, None], cache=self.cache,
                          kv_len=kv_len)[:, 0]

    def _decode_into(self, batch: int, kv_len: int, out: torch.Tensor) -> None:
        """The captured decode step: reads the persistent token/position buffers, writes logits into `out`."""
        if self.fast is not None:
            self.fast(self.tokens[:batch], self.positions[:batch], kv_len, out)
            return
        hidden = self.model.forward_hidden(self.tokens[:batch, None], self.positions[:batch, None],
                                           cache=self.cache, kv_len=kv_len)
        torch.matmul(self.model.model.norm(hidden[:, 0]), self.model.lm_head.weight.t(), out=out)

    def _process(self, launched: _Launched, events: list[StreamEvent] | None) -> None:
        if launched.event is not None:
            launched.event.synchronize()
        tokens, logprobs = launched.tokens.tolist(), launched.logprobs.tolist()
        for row, seq in launched.rows:
            if seq.finish_reason is not None:
                continue  # finished in an earlier step: this was a wasted lookahead row
            token = tokens[row]
            seq.token_ids.append(token)
            seq.logprobs.append(logprobs[row])
            req = seq.request
            params = req.params
            reason = "stop" if token in req.stop_ids or params.stopped_by_text(seq.token_ids, seq.text_from) else (
                "length" if len(seq.token_ids) >= params.max_new_tokens else None)
            if reason:
                self._finish(seq, reason)
            elif params.tool is not None and params.closed_tool_call(seq.token_ids, seq.text_from):
                self._pause(seq)
            if events is not None:
                events.append(StreamEvent(req.request_id, seq.sample_index, [token], [logprobs[row]],
                                          reason is not None, reason))

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.request.unfinished -= 1
        self.unfinished -= 1
        if not seq.request.unfinished and not seq.request.keep:
            self.requests.pop(seq.request.request_id, None)
        if seq.slot >= 0:
            self._release(seq)
        elif seq not in self.paused:  # waiting (aborted)
            self.waiting.remove(seq)
        self.paused.pop(seq, None)  # aborted while paused: its reply, when it comes, is dropped

    def _release(self, seq: _Sequence) -> None:
        """Free a running sequence's row (and blocks)."""
        self.slots[seq.slot] = None
        heapq.heappush(self.free_slots, seq.slot)
        if self.blocks is not None:
            self.blocks.release(seq.blocks)
            seq.blocks = []
            self.cache.clear_row(seq.slot)  # an idle row must not write into blocks that others get next
        seq.slot = -1
        self.running -= 1
        self._row_params = None
        key = id(seq.request.params)
        self._running_params[key] -= 1
        if not self._running_params[key]:
            del self._running_params[key]

    def _grow_blocks(self) -> None:
        """Paged: map the block that each running sequence's next decode write lands in; when none is free,
        preempt the most recently admitted sequences (possibly the one that needs the block)."""
        size = self.cache.block_size
        needy = sorted((s for s in self.slots if s is not None and s.fed // size >= len(s.blocks)
                        and s not in self.paused), key=lambda s: s.admitted_at)
        rows, logical, physical = [], [], []
        for seq in needy:  # oldest first: a victim is always newer than every sequence already served
            if self._make_room(seq, 1):
                seq.blocks += self.blocks.allocate(1)
                rows.append(seq.slot)
                logical.append(len(seq.blocks) - 1)
                physical.append(seq.blocks[-1])
        if rows:
            self.cache.set_entries(rows, logical, physical)

    def _make_room(self, seq: _Sequence, need: int) -> bool:
        """Paged: preempt the most recently admitted sequences until `need` blocks are free; False when `seq`
        itself was preempted on the way (it was the newest)."""
        while seq.slot >= 0 and self.blocks.num_free < need:
            self._preempt(max((s for s in self.slots if s is not None), key=lambda s: s.admitted_at))
        return seq.slot >= 0

    def _preempt(self, seq: _Sequence) -> None:
        """Free a running sequence's blocks and row; it waits at the front of the queue, its tokens kept, and
        is prefilled again (prompt + generated[:-1]) when re-admitted. A paused one waits for its reply first
        (_resume_answered queues it). Its rows in launched steps are wasted: re-admitted, it draws those
        positions again (same noise), and must not get the old draws on top."""
        self._release(seq)
        self._drop_launched_rows(seq)
        if seq not in self.paused:
            self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _drop_launched_rows(self, seq: _Sequence) -> None:
        for launched in self.inflight:
            launched.rows = [(row, s) for row, s in launched.rows if s is not seq]

    # ------------------------------------------------------------------ tools
    def _pause(self, seq: _Sequence) -> None:
        """Take a running sequence out of the decode steps and start its tool call on a worker thread."""
        if self._tool_pool is None:
            self._tool_pool = ThreadPoolExecutor(self._tool_workers, thread_name_prefix="r1lab-tool")
        self.paused[seq] = self._tool_pool.submit(_call_tool, seq.request.params.tool, list(seq.token_ids),
                                                  self.args.vocab_size)
        self._drop_launched_rows(seq)  # a lookahead step already launched for it: a wasted row
        # cache positions before the last sampled token's hold its K/V; from there on the idle row writes
        # throwaway K/V, rewritten by the resume's prefill
        seq.fed = len(seq.request.prompt) + len(seq.token_ids) - 1
        self._row_params = None

    def _resume_answered(self, events: list[StreamEvent] | None, wait_for_one: bool) -> None:
        """Append the replies of finished tool calls and resume their sequences: in place (K/V of the last
        sampled token and the reply written into the sequence's own cache, paged: into blocks taken first),
        or, for one preempted while paused, by queueing it for re-admission."""
        if wait_for_one:
            wait(list(self.paused.values()), timeout=_IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        answered = [seq for seq, call in self.paused.items() if call.done()]
        in_place = []
        for seq in answered:
            reply, error = self._reply(self.paused[seq])
            params = seq.request.params
            appended = reply[: params.max_new_tokens - len(seq.token_ids)]
            if appended:
                seq.tool_spans.append((len(seq.token_ids), len(appended)))
                seq.token_ids += appended
                seq.logprobs += [0.0] * len(appended)
            seq.tool_calls += error is not None
            seq.tool_errors += bool(error)
            seq.text_from = len(seq.token_ids)
            reason = "length" if len(seq.token_ids) >= params.max_new_tokens else None
            if events is not None and (appended or reason):
                events.append(StreamEvent(seq.request.request_id, seq.sample_index, appended, [0.0] * len(appended),
                                          reason is not None, reason, from_tool=True))
            if reason:
                self._finish(seq, reason)  # (which forgets the call)
                continue
            del self.paused[seq]
            if seq.slot >= 0:
                in_place.append(seq)
            else:
                self.waiting.appendleft(seq)
        if self.blocks is not None:
            self._blocks_for_replies(in_place)
            in_place = [seq for seq in in_place if seq.slot >= 0]
        if not in_place:
            return
        # seq.fed is the last sampled token's position (set at the pause): write context[fed:-1] from there
        self._prefill([[seq.slot, seq.context()[:-1], seq.fed] for seq in in_place
                       if seq.fed < len(seq.context()) - 1])
        index = device_tensor([seq.slot for seq in in_place], torch.long, self.device)
        self.tokens[index] = device_tensor([seq.context()[-1] for seq in in_place], torch.long, self.device)
        pos = [len(seq.context()) - 1 for seq in in_place]
        self.positions[index] = device_tensor(pos, torch.long, self.device)
        for seq, p in zip(in_place, pos):
            seq.fed = p
        self._row_params = None

    def _reply(self, call: Future) -> tuple[list[int], bool | None]:
        """(reply token ids, error) of a finished call; error None when `respond` made no call."""
        failure = call.exception()
        if failure is not None:
            # a broken tool costs the calls that hit it (an error reply of no tokens), never the engine
            if not self._tool_failure_logged:
                logger.warning("a tool call raised (treated as an error reply of no tokens; further failures "
                               "are only counted in Completion.tool_errors)", exc_info=failure)
                self._tool_failure_logged = True
            return [], True
        reply = call.result()
        if reply is None:
            return [], None
        return list(reply.token_ids), bool(reply.error)

    def _blocks_for_replies(self, resumed: list[_Sequence]) -> None:
        """Paged: map the blocks that resumed sequences' contexts now reach (the reply's positions and the
        next decode write), preempting the most recently admitted sequences when none are free (as in
        _grow_blocks: oldest served first, a victim may be the resumed sequence itself)."""
        rows, tables = [], []
        for seq in sorted(resumed, key=lambda s: s.admitted_at):
            if seq.slot < 0:  # preempted for an older resumed one
                continue
            need = self._blocks_for(len(seq.context())) - len(seq.blocks)
            if self._make_room(seq, need) and need > 0:
                seq.blocks += self.blocks.allocate(need)
                rows.append(seq.slot)
                tables.append(seq.blocks)
        if rows:
            self.cache.set_rows(rows, tables)


def _call_tool(tool, token_ids: list[int], vocab_size: int):
    """A worker thread's job: the tool's reply to the call that ends `token_ids` (the sample's generated ids);
    ids the model cannot embed are the tool's bug, raised here so they cost only this call."""
    reply = tool.respond(token_ids)
    if reply is not None and any(not 0 <= t < vocab_size for t in reply.token_ids):
        raise ValueError(f"tool reply has token ids outside [0, {vocab_size})")
    return reply


def _tool_mask(length: int, spans: list[tuple[int, int]]) -> list[bool]:
    mask = [False] * length
    for start, size in spans:
        mask[start : start + size] = [True] * size
    return mask


def noise_key(seed: int, sample_index: int) -> int:
    """A sequence's noise key in [0, 2**62): splitmix64 of the request seed, then of the sample index, so
    neighbouring seeds (generate's seed + i) and siblings get unrelated noise streams."""
    mask = (1 << 64) - 1

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    return splitmix64(splitmix64(seed & mask) ^ sample_index) >> 2
