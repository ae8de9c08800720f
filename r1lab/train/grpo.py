"""GRPO trainer: prompts → rollout engine (same module, same process) → rewards → group advantages →
μ passes over minibatches → optimizer step → next rollout.

π_old is the policy that sampled, as the rollout engine scored it: the engine's own log-probs of its samples
(at T != 1 one no-grad forward rescores them at T, the engine reporting T = 1 log-probs). The first update's
ratio π_θ / π_old therefore already carries any engine-vs-trainer numeric mismatch (kernels, dtypes), clipped
like any ratio, so no separate importance correction is needed (TRL recomputes π_old with the trainer and
adds truncated IS against the engine; grpo_math.truncated_is_weights is that weight, for such a design).
The mismatch is logged as `logprob_mismatch` (mean |log π_θ - log π_old| over the step's updates; ~0.002
in bf16 on an H200 with one update per rollout).

A GRPO loss near zero is normal: with ratio ≈ 1 and group-normalized advantages that average to zero, the
surrogate's value is ~0 while its gradient is not. Watch reward, accuracy and response length instead.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from r1lab import distributed as D
from r1lab.config import ConfigError, check_ranges
from r1lab.rewards import compose_rewards
from r1lab.rewards.compose import RewardSpec
from r1lab.rollout import Completion, SamplingParams, generate
from r1lab.run_dir import RunDir
from r1lab.tasks import Problem, Task, load_task
from r1lab.tools import PythonTool
from r1lab.train.batching import PackedBatch, check_whole_groups, minibatch_plan, pack_sequences, unpack_to_sequences
from r1lab.train.checkpoint import load_latest_checkpoint, restore_checkpoint, save_checkpoint
from r1lab.train.grpo_math import Objective, dynamic_sampling_filter, group_advantages, overlong_filter_mask, policy_loss
from r1lab.train.logprobs import token_logprobs
from r1lab.train.optim import adamw
from r1lab.train.parallel import gathered_for_rollout, reference_replica, shard_model
from r1lab.train.step import train_step

logger = logging.getLogger(__name__)


@dataclass
class TaskConfig:
    name: str = "chain_sum"
    """Task spec for r1lab.tasks.load_task (a reasoning-gym name, jsonl:PATH, humaneval, champ)."""
    train_size: int = 4000
    """Training problems (the train split)."""
    test_size: int = 100
    """Held-out problems for before/after evaluation (the disjoint test split)."""
    seed: int = 0
    """Seed of the task generator."""
    template: str | None = None
    """Prompt template: r1_zero, chat, plain or a string with {question}; None: the task's own (r1_zero for
    math tasks, chat for HumanEval)."""
    instruction: str | None = None
    """What a chat-template prompt asks for after the question; None: the task's own (math: reason step by
    step and put the answer in \\boxed{}). Real-checkpoint R1-Zero recipes ask for <think> and <answer> tags."""
    options: dict = field(default_factory=dict)
    """Keyword arguments for the task source (reasoning-gym dataset config, jsonl field names,
    holdout_fraction); empty means r1lab's default for that task (DEFAULT_TASK_OPTIONS)."""

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"train_size": 1, "test_size": 0})

    def source_options(self) -> dict:
        return dict(self.options) if self.options else dict(DEFAULT_TASK_OPTIONS.get(self.name, {}))

    def load(self, split: str) -> Task:
        size = self.train_size if split == "train" else self.test_size
        task = load_task(self.name, split=split, size=size, seed=self.seed, **self.source_options())
        if self.instruction is not None:
            task.instruction = self.instruction
        return task


# The embedded default's difficulty: what the tiny base saw in pretraining (2-4 terms of 1-2 digits).
DEFAULT_TASK_OPTIONS = {"chain_sum": dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2)}


@dataclass
class GRPOConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    """Reward terms and weights (R1: accuracy + format with the same weight)."""
    objective: Objective = field(default_factory=Objective)
    """Advantage scaling, clipping, aggregation, KL, filters (see grpo_math.Objective and its presets)."""
    steps: int = 60
    """Rollout → update iterations."""
    prompts_per_step: int = 16
    """Distinct prompts per rollout (R1: 32)."""
    group_size: int = 8
    """Completions per prompt G (R1: 16)."""
    max_new_tokens: int = 128
    """Completion length limit."""
    temperature: float = 1.0
    """Rollout temperature (R1: 1.0). The loss's log-probs (current, old, reference) are those of the
    distribution sampled from, softmax(logits / temperature), as verl and TRL compute them."""
    top_p: float = 1.0
    """Rollout nucleus."""
    stop_at_eos: bool = True
    """Stop a completion at the tokenizer's stop tokens (False: always max_new_tokens, for benchmarks)."""
    stop_strings: list[str] = field(default_factory=list)
    """Text that ends a completion (e.g. "</answer>": an instruct model that keeps talking after its answer
    fails the format reward and runs to max_new_tokens); the completion is scored up to it."""
    tool: PythonTool | None = None
    """A sandboxed Python interpreter the model may call inside its reasoning (r1lab.tools: <python> code
    </python> is answered with <output> ... </output>, appended as untrained tokens); None: no tool. Rewards
    score the text without the tool outputs."""
    epochs_per_rollout: int = 1
    """μ: passes over each rollout."""
    num_minibatches: int = 1
    """Optimizer steps per pass (R1: 16); any number, groups need not divide."""
    micro_batch_tokens: int = 8192
    """Token budget of one packed forward/backward (gradient accumulation within a minibatch)."""
    lr: float = 1e-4
    """AdamW learning rate (constant after warmup, as R1)."""
    warmup_steps: int = 3
    """Linear LR warmup, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm."""
    ref_reset_every: int = 0
    """Reset the KL reference to the policy every N steps (R1: 400); 0 never (needs objective.beta > 0)."""
    router_bias_gamma: float = 1e-3
    """Aux-loss-free MoE bias update speed after each optimizer step (0 freezes routing)."""
    max_refill_rounds: int = 2
    """With dynamic sampling: extra rollouts to replace groups whose rewards were all equal."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (saves memory for long completions)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 1
    """Checkpoints kept (the newest); one holds what resume needs (weights, optimizer, data cursor, RNG)."""
    sample_log_every: int = 5
    """Write a few prompt/completion/reward records to samples.jsonl every N steps."""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Reject a config that could only fail later (after a model load and an evaluation, or mid-run)."""
        check_ranges(self, at_least={"group_size": 2, "prompts_per_step": 1, "max_new_tokens": 1,
                                     "epochs_per_rollout": 1, "num_minibatches": 1, "micro_batch_tokens": 1,
                                     "steps": 0, "warmup_steps": 0, "ref_reset_every": 0, "max_refill_rounds": 0,
                                     "save_every": 0, "sample_log_every": 0, "temperature": 0, "weight_decay": 0,
                                     "router_bias_gamma": 0, "keep_checkpoints": 1},
                     positive=("lr", "grad_clip"), unit=("top_p",))
        RewardSpec.from_dict(self.rewards)  # weights are numbers; names are checked against the task later
        if self.objective.soft_overlong_cache > self.max_new_tokens:
            raise ConfigError(f"objective.soft_overlong_cache={self.objective.soft_overlong_cache} must be <= "
                              f"max_new_tokens={self.max_new_tokens} (DAPO: a 4,096-token band of 20,480)")

    def reward_spec(self) -> dict:
        """The reward terms the trainer scores with: `rewards`, plus DAPO's soft overlong penalty when the
        objective asks for it (one formula: the `overlong` reward, rewards.overlong_penalty)."""
        spec = dict(self.rewards)
        if self.objective.soft_overlong_cache and "overlong" not in spec:
            spec["overlong"] = {"weight": 1.0, "max_len": self.max_new_tokens,
                                "cache_len": self.objective.soft_overlong_cache}
        return spec


@dataclass
class Rollout:
    """One step's sampled groups, prompt-major: completion j of group g is completions[g * G + j]."""

    problem_ids: list[int]
    """[groups] index of each group's problem in the task."""
    prompts: list[list[int]]
    """[groups] prompt token ids."""
    completions: list[Completion]
    """[groups × G] the engine's samples; prompt_index is the group."""
    texts: list[str]
    """[groups × G] completion texts (Task.completion_text), as scored."""
    scores: list[dict[str, float]]
    """[groups × G] reward terms (unweighted) and their weighted "total"."""
    rollout_seconds: float = 0.0
    scoring_seconds: float = 0.0

    @property
    def n_groups(self) -> int:
        return len(self.problem_ids)

    def totals(self) -> torch.Tensor:
        """[groups × G] total rewards."""
        return torch.tensor([s["total"] for s in self.scores], dtype=torch.float32)

    def sequences(self) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt + completion ids of every completion, and its loss mask (1 on the sampled completion tokens,
        0 on the prompt and on tool outputs)."""
        return _sequences(self.prompts, self.completions)

    def select(self, groups: list[int], group_size: int) -> "Rollout":
        """The rollout restricted to `groups` (renumbered 0..len-1 in that order)."""
        members = [i for g in groups for i in range(g * group_size, (g + 1) * group_size)]
        remap = {g: j for j, g in enumerate(groups)}
        completions = [dataclasses.replace(self.completions[i], prompt_index=remap[i // group_size]) for i in members]
        return Rollout([self.problem_ids[g] for g in groups], [self.prompts[g] for g in groups], completions,
                       [self.texts[i] for i in members], [self.scores[i] for i in members],
                       self.rollout_seconds, self.scoring_seconds)

    def __add__(self, other: "Rollout") -> "Rollout":
        shift = self.n_groups
        completions = self.completions + [dataclasses.replace(c, prompt_index=c.prompt_index + shift)
                                          for c in other.completions]
        return Rollout(self.problem_ids + other.problem_ids, self.prompts + other.prompts, completions,
                       self.texts + other.texts, self.scores + other.scores,
                       self.rollout_seconds + other.rollout_seconds, self.scoring_seconds + other.scoring_seconds)


@dataclass
class UpdateBatch:
    """What the policy update trains on, per completion of the rollout (index i = completion i)."""

    seqs: list[list[int]]
    """Prompt + completion ids."""
    loss_masks: list[list[int]]
    """1 on the sampled completion tokens (0 on the prompt and on tool outputs)."""
    advantages: torch.Tensor
    """[N] group-normalized advantages."""
    old_logp: list[torch.Tensor]
    """log π_old of each sampled completion token [n_sampled] (the rollout policy's)."""
    ref_logp: list[torch.Tensor] | None
    """log π_ref of each sampled completion token [n_sampled] when β > 0."""
    weights: torch.Tensor | None
    """[N] 0/1 per completion when truncated samples are masked out (DAPO's overlong filter), else None."""

    def token_weights(self, i: int) -> torch.Tensor:
        """[len] the loss weight of completion i's tokens."""
        n = len(self.old_logp[i])
        return torch.ones(n) if self.weights is None else torch.full((n,), float(self.weights[i]))


class StepMeter:
    """A step's update metrics, independent of how its minibatches were cut into micro-batches: token-level
    stats (pg_loss, clip fractions, ratio_mean, entropy, logprob_mismatch, kl) are means over all loss tokens
    (each micro-batch weighted by its tokens), ratio_max / ratio_min the extremes, `tokens` the loss tokens
    per optimizer step, and grad_norm, lr and the expert balance means over the optimizer steps."""

    EXTREMES = {"ratio_max": max, "ratio_min": min}

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.extremes: dict[str, float] = {}
        self.tokens = 0.0
        self.per_update: dict[str, list[float]] = {}

    def add_micro_batch(self, stats: dict) -> None:
        weight = float(stats["tokens"])
        self.tokens += weight
        for k, v in stats.items():
            if k in self.EXTREMES:
                self.extremes[k] = self.EXTREMES[k](self.extremes.get(k, float(v)), float(v))
            elif k != "tokens":
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight

    def add_update(self, **values: float | None) -> None:
        for k, v in values.items():
            if v is not None:
                self.per_update.setdefault(k, []).append(float(v))

    def result(self) -> dict[str, float]:
        updates = len(self.per_update.get("grad_norm", [])) or 1
        out = {k: v / max(self.tokens, 1.0) for k, v in self.sums.items()}
        out |= self.extremes | {"tokens": self.tokens / updates}
        return out | {k: sum(v) / len(v) for k, v in self.per_update.items()}


class Trainer:
    """Holds the policy, optimizer, data cursor and (if β > 0) the reference model; `step()` does one
    rollout + update and returns its metrics."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, run_dir: RunDir, reward_models: dict | None = None,
                 dist: D.DistInfo | None = None):
        self.cfg, self.model, self.tok, self.run_dir = cfg, model, tokenizer, run_dir
        self.dist = dist or D.single_process(cfg.device)
        if self.dist.is_main:
            _warn_on_tiny_defaults(cfg, model)
        if self.dist.is_distributed:  # shard before the optimizer sees the parameters
            shard_model(model, self.dist)
        self.device = self.dist.device if self.dist.is_distributed else torch.device(cfg.device)
        self._policy = model  # what generate() runs on (the gathered replica under FSDP)
        self.loss_temperature = cfg.temperature if cfg.temperature > 0 else 1.0  # greedy rollouts: raw logits
        self.task: Task = cfg.task.load("train")
        self.prompt_ids: dict[int, list[int]] = {}  # problem index → token ids (rendered once)
        self.order = list(range(len(self.task.problems)))
        random.Random(cfg.seed).shuffle(self.order)
        self.cursor = 0
        self.reward = compose_rewards(cfg.reward_spec(), task=self.task, reward_models=reward_models)
        self.opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.99))
        warm = max(1, cfg.warmup_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.ref = self._snapshot() if cfg.objective.beta > 0 else None
        self.stop_ids = tokenizer.stop_ids if cfg.stop_at_eos else []
        self.tool_hook = cfg.tool.hook(tokenizer) if cfg.tool is not None else None
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.step_index = 0
        self.last_samples: list[dict] = []
        self.last_checkpoint: Path | None = None

    def _snapshot(self):
        if self.dist.is_distributed:  # a frozen plain replica per rank, refreshed in place on a reset
            return reference_replica(self.model, self.dist, getattr(self, "ref", None))
        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # ------------------------------------------------------------------ data
    def _next_problems(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self.cursor == len(self.order):
                self.cursor = 0
                random.Random(self.cfg.seed + len(out) + self.step_index).shuffle(self.order)
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def _prompt(self, i: int) -> list[int]:
        if i not in self.prompt_ids:
            self.prompt_ids[i] = self.task.prompt(self.task.problems[i], self.tok, self.cfg.task.template).ids
        return self.prompt_ids[i]

    def problem(self, rollout: Rollout, completion_index: int) -> Problem:
        return self.task.problems[rollout.problem_ids[rollout.completions[completion_index].prompt_index]]

    # ------------------------------------------------------------------ rollout + scoring
    def _rollout(self, problem_ids: list[int], seed: int) -> Rollout:
        cfg = self.cfg
        prompts = [self._prompt(i) for i in problem_ids]
        # generate() seeds prompt i with seed + i: give every (call, rank) its own block of 2**20 seeds, so
        # no prompt of one step shares its noise with a prompt of the next
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                n=cfg.group_size, stop_token_ids=self.stop_ids,
                                seed=(seed * 4096 + self.dist.rank) << 20, stop_strings=tuple(cfg.stop_strings),
                                detokenize=self.tok.decode, tool=self.tool_hook)
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            comps = generate(self._policy, prompts, params)
            if self.loss_temperature != 1.0:
                # the engine reports raw-logit (T = 1) log-probs; π_old is softmax(logits / T), so score the
                # samples once more with the policy that drew them (a plain replica under FSDP: no collectives)
                for c, logp in zip(comps, self._logprobs(self._policy, *_sequences(prompts, comps))):
                    sampled = iter(logp.tolist())  # tool tokens keep their 0.0 placeholders
                    c.logprobs = [lp if tool else next(sampled) for lp, tool in zip(c.logprobs, c.tool_mask)]
        t1 = time.perf_counter()
        texts = [self.task.completion_text(self.tok, c.token_ids, stop_strings=cfg.stop_strings) for c in comps]
        problems = [self.task.problems[problem_ids[c.prompt_index]] for c in comps]
        scored = texts if cfg.tool is None else [cfg.tool.without_outputs(t) for t in texts]
        scores = self.reward.batch(problems, scored, lengths=[len(c.token_ids) for c in comps])
        return Rollout(problem_ids, prompts, comps, texts, scores, t1 - t0, time.perf_counter() - t1)

    def _collect(self) -> tuple[Rollout, dict]:
        """Roll out prompts_per_step groups; with dynamic sampling, replace all-equal groups (bounded)."""
        cfg = self.cfg
        # Every rank draws the same global prompts (the cursor stays in step) and keeps its whole-prompt share.
        mine = D.rank_share(self._next_problems(cfg.prompts_per_step), self.dist)
        target = len(mine)
        with gathered_for_rollout(self.model, self.dist) as self._policy:
            batch = self._rollout(mine, seed=(cfg.seed * 1_000_003 + self.step_index) * 64)
            stats = {"zero_variance_groups": self._zero_variance_share(batch) if batch.completions else 0.0}
            if cfg.objective.dynamic_sampling:
                batch = self._keep_informative(batch)
                for r in range(cfg.max_refill_rounds):
                    missing = target - batch.n_groups
                    most = D.max_across_ranks(missing, self.dist)
                    if most <= 0:
                        break
                    draw = D.rank_share(self._next_problems(most * self.dist.world_size), self.dist)[:max(missing, 0)]
                    if draw:
                        seed = (cfg.seed * 1_000_003 + self.step_index) * 64 + 1 + r % 63  # the step's refill blocks
                        batch = batch + self._keep_informative(self._rollout(draw, seed=seed))
        self._policy = self.model
        return batch, stats

    def _zero_variance_share(self, batch: Rollout) -> float:
        keep = dynamic_sampling_filter(batch.totals(), group_size=self.cfg.group_size)
        return 1.0 - keep.float().mean().item()

    def _keep_informative(self, batch: Rollout) -> Rollout:
        G = self.cfg.group_size
        keep = dynamic_sampling_filter(batch.totals(), group_size=G).view(-1, G)[:, 0].tolist()
        return batch.select([g for g, k in enumerate(keep) if k], G)

    # ------------------------------------------------------------------ update
    def step(self) -> dict:
        cfg, obj = self.cfg, self.cfg.objective
        t_start = time.perf_counter()
        batch, stats = self._collect()
        comps, G = batch.completions, cfg.group_size
        check_whole_groups([c.prompt_index for c in comps], G)  # so group advantages are rank-local
        metrics = self._rollout_metrics(batch) | stats
        if D.sum_across_ranks(batch.n_groups, self.dist) == 0:
            self.step_index += 1
            return D.all_reduce_metrics(metrics | {"skipped": 1.0}, self.dist)
        totals = batch.totals()
        seqs, masks = batch.sequences()
        update = UpdateBatch(
            seqs, masks, advantages=group_advantages(totals, G, **obj.advantage_kwargs()) if batch.n_groups else totals,
            old_logp=[sampled_logprobs(c) for c in comps],
            ref_logp=self._logprobs(self.ref, seqs, masks) if self.ref is not None else None,
            weights=overlong_filter_mask([c.finish_reason for c in comps]) if obj.mask_truncated else None)

        self.model.train()
        t_train = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 31 + self.step_index)
        meter = StepMeter()
        for _ in range(cfg.epochs_per_rollout):
            for mb in minibatch_plan(batch.n_groups, G, cfg.num_minibatches, self.dist, generator=gen):
                self._update(mb, update, meter)
        if self.ref is not None and cfg.ref_reset_every and (self.step_index + 1) % cfg.ref_reset_every == 0:
            self.ref = self._snapshot()
        t_end = time.perf_counter()
        n_tokens = sum(len(s) for s in seqs)
        metrics |= meter.result() | memory_metrics(self.device)
        metrics |= {
            "time/rollout": batch.rollout_seconds, "time/scoring": batch.scoring_seconds,
            "time/training": t_end - t_train, "time/step": t_end - t_start,
            "tokens_per_s": n_tokens * cfg.epochs_per_rollout / (t_end - t_train),
            "generated_tokens_per_s": sum(len(c.token_ids) for c in comps) / max(batch.rollout_seconds, 1e-9),
        }
        self.last_samples = [
            {"prompt": self.problem(batch, i).question, "gold": self.problem(batch, i).gold,
             "completion": batch.texts[i], "reward": batch.scores[i]["total"],
             **{f"reward/{k}": v for k, v in batch.scores[i].items() if k != "total"}}
            for i in range(min(len(comps), 2 * G)) if i % G < 2
        ]
        self.step_index += 1
        return D.all_reduce_metrics(metrics, self.dist)

    def _update(self, minibatch: list[int], batch: UpdateBatch, meter: StepMeter) -> None:
        """One optimizer step on the completions `minibatch`, packed into micro-batches by token budget."""
        cfg, obj = self.cfg, self.cfg.objective
        token_weights = {i: batch.token_weights(i) for i in minibatch}
        packs = _pack(cfg, [batch.seqs[i] for i in minibatch], [batch.loss_masks[i] for i in minibatch]) if minibatch else []

        def counts(pack: PackedBatch) -> dict[str, float]:
            rows = [token_weights[minibatch[j]] for j in pack.seq_index]
            return {"tokens": float(sum(w.sum() for w in rows)), "seqs": float(sum(1 for w in rows if w.sum() > 0))}

        def loss_fn(pack: PackedBatch, totals: dict[str, float]):
            pack = pack.to(self.device)
            logp, entropy = token_logprobs(self.model, pack.input_ids, pack.targets, pack.positions, pack.doc_ids,
                                           with_entropy=True, mask=pack.loss_mask, temperature=self.loss_temperature)
            rows = [minibatch[j] for j in pack.seq_index]
            cur = pad_sequence(unpack_to_sequences(logp, pack, loss_tokens_only=True), batch_first=True)
            ent = pad_sequence(unpack_to_sequences(entropy, pack, loss_tokens_only=True), batch_first=True)
            old = pad_sequence([batch.old_logp[i] for i in rows], batch_first=True).to(self.device)
            mask = pad_sequence([token_weights[i] for i in rows], batch_first=True).to(self.device)
            ref = None if batch.ref_logp is None else pad_sequence([batch.ref_logp[i] for i in rows],
                                                                   batch_first=True).to(self.device)
            loss, stats = policy_loss(cur, old, batch.advantages[rows].to(self.device), mask, ref_logp=ref,
                                      total_tokens=totals["tokens"], total_seqs=totals["seqs"], **obj.loss_kwargs())
            stats["entropy"] = (ent.detach() * mask).sum() / mask.sum().clamp(min=1)
            stats["logprob_mismatch"] = ((cur.detach() - old).abs() * mask).sum() / mask.sum().clamp(min=1)
            return loss, stats

        lr = self.opt.param_groups[0]["lr"]  # the rate this optimizer step uses (the scheduler moves it after)
        # global totals + loss × world: FSDP's gradient mean over ranks is then the single-process gradient
        result = train_step(self.model, self.opt, packs, loss_fn, counts=counts, normalizers=("tokens", "seqs"),
                            info=self.dist, grad_clip=cfg.grad_clip, router_bias_gamma=cfg.router_bias_gamma,
                            scheduler=self.sched)
        for stats in result.stats:
            meter.add_micro_batch(stats)
        meter.add_update(grad_norm=result.grad_norm, lr=lr, expert_load_max_over_mean=result.expert_balance)

    def _logprobs(self, model, seqs, masks) -> list[torch.Tensor]:
        """Completion-token log-probs [len] (fp32, CPU) of each sequence under an unsharded `model` (the
        reference, or the rollout policy) at the loss temperature."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        if not seqs:  # a rank left without groups this step (the replica needs no collective)
            return []
        with torch.no_grad():
            for pack in _pack(self.cfg, seqs, masks):
                pack = pack.to(self.device)
                logp = token_logprobs(model, pack.input_ids, pack.targets, pack.positions, pack.doc_ids,
                                      mask=pack.loss_mask, temperature=self.loss_temperature)
                for i, v in zip(pack.seq_index, unpack_to_sequences(logp, pack, loss_tokens_only=True)):
                    out[i] = v.float().cpu()
        return out

    def _rollout_metrics(self, batch: Rollout) -> dict:
        scores, comps = batch.scores, batch.completions
        if not comps:
            return {}
        n = len(comps)
        out = {"reward": sum(s["total"] for s in scores) / n}
        for key in scores[0]:
            if key != "total":
                out[f"reward/{key}"] = sum(s[key] for s in scores) / n
        if "accuracy" in scores[0]:  # a pass is full credit (some verifiers give 0.01 to a parsed wrong answer)
            out["accuracy"] = sum(s["accuracy"] >= 1.0 for s in scores) / n
        if "format" in scores[0]:
            out["format_rate"] = out["reward/format"]
        lengths = [len(c.token_ids) for c in comps]
        out["response_length"] = sum(lengths) / n
        out["response_length_max"] = float(max(lengths))
        out["truncated_rate"] = sum(c.finish_reason == "length" for c in comps) / n
        if self.cfg.tool is not None:
            calls = sum(c.tool_calls for c in comps)
            out["tool/calls_per_answer"] = calls / n
            out["tool/answers_with_calls"] = sum(c.tool_calls > 0 for c in comps) / n
            out["tool/error_rate"] = sum(c.tool_errors for c in comps) / max(calls, 1)
            out["tool/token_share"] = sum(sum(c.tool_mask) for c in comps) / max(sum(lengths), 1)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        # one process: a plain checkpoint; torchrun: consolidated HF folder + sharded state
        self.last_checkpoint = save_checkpoint(
            self.run_dir.path, self.step_index, self.model, self.opt, self.sched, {"cursor": self.cursor,
            "order": self.order}, keep_last=self.cfg.keep_checkpoints, tokenizer=self.tok, info=self.dist)
        return self.last_checkpoint

    def resume(self) -> bool:
        found = load_latest_checkpoint(self.run_dir.path)
        if found is None:
            return False
        step, path = found
        extra = restore_checkpoint(path, self.model, self.opt, self.sched, self.dist)  # any process count
        self.cursor, self.order, self.step_index = extra["cursor"], list(extra["order"]), step
        if self.cfg.objective.beta > 0:
            self.ref = self._snapshot()  # a resumed run re-anchors KL at the restored policy
        return True


LARGE_MODEL_PARAMETERS = 50_000_000


def _warn_on_tiny_defaults(cfg: GRPOConfig, model) -> None:
    """A pretrained checkpoint trained with the embedded tiny model's settings goes to word salad in one step
    (lr 5e-4 took Qwen2.5-Coder-0.5B's entropy from 0.87 to 3.98): say so before the run starts."""
    n = model.num_parameters()
    if n >= LARGE_MODEL_PARAMETERS and cfg.lr >= 1e-4:
        logger.warning(f"warning: lr={cfg.lr:g} is a setting for r1lab's tiny embedded models; a pretrained "
                       f"checkpoint of {n / 1e6:.0f}M parameters wants ~1e-6 "
                       f"(recipes/zero-qwen2.5-coder-0.5b.yaml)")


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the process's resident set (GiB) and, on CUDA, the step's peak allocation (reset)."""
    import resource

    out = {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["memory/peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _sequences(prompts: list[list[int]], comps) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt + completion token ids of each completion (exactly the ids the engine produced: sampled and tool
    tokens interleaved, never re-tokenized), and its loss mask (1 on the sampled tokens only)."""
    seqs = [prompts[c.prompt_index] + c.token_ids for c in comps]
    masks = [[0] * len(prompts[c.prompt_index]) + [0 if tool else 1 for tool in c.tool_mask] for c in comps]
    return seqs, masks


def sampled_logprobs(completion: Completion) -> torch.Tensor:
    """[n_sampled] fp32 log π_old of the completion's sampled tokens (tool tokens have none)."""
    return torch.tensor([lp for lp, tool in zip(completion.logprobs, completion.tool_mask) if not tool],
                        dtype=torch.float32)


def _pack(cfg: GRPOConfig, seqs, masks) -> list[PackedBatch]:
    """Rows as long as the longest sequence (attention cost grows with row length squared), as many rows
    per forward as the token budget allows."""
    row_len = max(len(s) for s in seqs)
    return pack_sequences(seqs, masks, row_len, rows_per_batch=max(1, cfg.micro_batch_tokens // row_len))


def train_grpo(cfg: GRPOConfig, run_dir: RunDir, model, tokenizer, *, resume: bool = False, on_step=None,
               reward_models: dict | None = None, dist: D.DistInfo | None = None) -> Trainer:
    """Run cfg.steps GRPO steps (continuing a checkpointed run when resume=True); returns the Trainer.

    reward_models: learned reward models by the name their term has in cfg.rewards (R1's final stage)."""
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, model, tokenizer, run_dir, reward_models=reward_models, dist=dist)
    main = trainer.dist.is_main  # rank 0 alone writes logs (checkpoint saves are collective)
    if resume:
        trainer.resume()  # no checkpoint yet: the run starts over at step 0
        if main:  # either way, lines logged past the step it continues from are dropped
            trainer.run_dir = run_dir = RunDir(run_dir.path, resume_step=trainer.step_index - 1)
    while trainer.step_index < cfg.steps:
        step = trainer.step_index
        metrics = trainer.step()
        if main:
            run_dir.log_metrics(step, metrics)
        if main and cfg.sample_log_every and step % cfg.sample_log_every == 0:
            run_dir.log_samples(step, trainer.last_samples)
        if on_step is not None and main:
            on_step(step, metrics)
        if cfg.save_every and trainer.step_index % cfg.save_every == 0 and trainer.step_index < cfg.steps:
            trainer.save()
    trainer.save()
    run_dir.close()  # TensorBoard writes from a thread: close() drains its queue (a torchrun rank ends in os._exit)
    return trainer
