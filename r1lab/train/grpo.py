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
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from r1lab.config import check_ranges
from r1lab.rewards import compose_rewards
from r1lab.rewards.compose import RewardSpec
from r1lab.rollout import SamplingParams, generate
from r1lab.tasks import load_task, render_prompt
from r1lab.train.batching import pack_sequences, unpack_to_sequences
from r1lab.train import distributed as D
from r1lab.train.checkpoint import load_latest_checkpoint
from r1lab.train.grpo_math import Objective, dynamic_sampling_filter, group_advantages, overlong_filter_mask, policy_loss
from r1lab.train.logprobs import token_logprobs
from r1lab.train.optim import adamw
from r1lab.train.run_dir import RunDir


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
    template: str = "r1_zero"
    """Prompt template: r1_zero, chat, or a string with {question}."""
    options: dict = field(default_factory=dict)
    """Keyword arguments for the task source (reasoning-gym dataset config, jsonl field names,
    holdout_fraction); empty means r1lab's default for that task (DEFAULT_TASK_OPTIONS)."""

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"train_size": 1, "test_size": 0})

    def source_options(self) -> dict:
        return dict(self.options) if self.options else dict(DEFAULT_TASK_OPTIONS.get(self.name, {}))

    def load(self, split: str):
        size = self.train_size if split == "train" else self.test_size
        return load_task(self.name, split=split, size=size, seed=self.seed, **self.source_options())


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
                                     "save_every": 0, "sample_log_every": 0, "temperature": 0, "weight_decay": 0},
                     positive=("lr", "grad_clip"), unit=("top_p",))
        RewardSpec.from_dict(self.rewards)  # weights are numbers; names are checked against the task later


class Trainer:
    """Holds the policy, optimizer, data cursor and (if β > 0) the reference model; `step()` does one
    rollout + update and returns its metrics."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, run_dir: RunDir, reward_models: dict | None = None,
                 dist: D.DistInfo | None = None):
        self.cfg, self.model, self.tok, self.run_dir = cfg, model, tokenizer, run_dir
        self.dist = dist or D.single_process(cfg.device)
        if self.dist.is_distributed:  # shard before the optimizer sees the parameters
            D.shard_model(model, self.dist)
        self.device = self.dist.device if self.dist.is_distributed else torch.device(cfg.device)
        self._policy = model  # what generate() runs on (the gathered replica under FSDP)
        self.loss_temperature = cfg.temperature if cfg.temperature > 0 else 1.0  # greedy rollouts: raw logits
        self.task = cfg.task.load("train")
        self.prompt_ids = {}  # problem index → token ids (rendered once)
        self.order = list(range(len(self.task.problems)))
        random.Random(cfg.seed).shuffle(self.order)
        self.cursor = 0
        self.reward = compose_rewards(cfg.rewards, task=self.task, reward_models=reward_models)
        self.opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.99))
        warm = max(1, cfg.warmup_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.ref = self._snapshot() if cfg.objective.beta > 0 else None
        self.stop_ids = tokenizer.stop_ids if cfg.stop_at_eos else []
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.step_index = 0
        self.last_samples: list[dict] = []

    def _snapshot(self):
        if self.dist.is_distributed:  # a frozen plain replica per rank, refreshed in place on a reset
            return D.reference_replica(self.model, self.dist, getattr(self, "ref", None))
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
            text = render_prompt(self.cfg.task.template, self.task.problems[i].question,
                                 apply_chat_template=self.tok.apply_chat_template)
            self.prompt_ids[i] = self.tok.encode(text)
        return self.prompt_ids[i]

    # ------------------------------------------------------------------ rollout + scoring
    def _rollout(self, problem_ids: list[int], seed: int) -> dict:
        cfg = self.cfg
        prompts = [self._prompt(i) for i in problem_ids]
        # generate() seeds prompt i with seed + i: give every (call, rank) its own block of 2**20 seeds, so
        # no prompt of one step shares its noise with a prompt of the next
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                n=cfg.group_size, stop_token_ids=self.stop_ids,
                                seed=(seed * 4096 + self.dist.rank) << 20)
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            comps = generate(self._policy, prompts, params)
            if self.loss_temperature != 1.0:
                # the engine reports raw-logit (T = 1) log-probs; π_old is softmax(logits / T), so score the
                # samples once more with the policy that drew them (a plain replica under FSDP: no collectives)
                for c, logp in zip(comps, self._logprobs(self._policy, *_sequences(prompts, comps))):
                    c.logprobs = logp.tolist()
        t1 = time.perf_counter()
        texts = [self.tok.decode(c.token_ids, skip_special_tokens=True) for c in comps]
        problems = [self.task.problems[problem_ids[c.prompt_index]] for c in comps]
        scores = self.reward.batch(problems, texts, lengths=[len(c.token_ids) for c in comps])
        t2 = time.perf_counter()
        return dict(problem_ids=problem_ids, prompts=prompts, comps=comps, texts=texts, problems=problems,
                    scores=scores, t_rollout=t1 - t0, t_score=t2 - t1)

    def _collect(self) -> tuple[dict, dict]:
        """Roll out prompts_per_step groups; with dynamic sampling, replace all-equal groups (bounded)."""
        cfg = self.cfg
        G = cfg.group_size
        # Every rank draws the same global prompts (the cursor stays in step) and keeps its whole-prompt share.
        mine = D.rank_share(self._next_problems(cfg.prompts_per_step), self.dist)
        target = len(mine)
        with D.gathered_for_rollout(self.model, self.dist) as self._policy:
            batch = self._rollout(mine, seed=(cfg.seed * 1_000_003 + self.step_index) * 64)
            stats = {"zero_variance_groups": self._zero_variance_share(batch) if batch["comps"] else 0.0}
            if cfg.objective.dynamic_sampling:
                batch = self._keep_informative(batch)
                for r in range(cfg.max_refill_rounds):
                    missing = target - len(batch["problem_ids"])
                    most = D.max_across_ranks(missing, self.dist)
                    if most <= 0:
                        break
                    draw = D.rank_share(self._next_problems(most * self.dist.world_size), self.dist)[:max(missing, 0)]
                    if draw:
                        seed = (cfg.seed * 1_000_003 + self.step_index) * 64 + 1 + r % 63  # the step's refill blocks
                        more = self._keep_informative(self._rollout(draw, seed=seed))
                        batch = _concat_rollouts(batch, more, G)
        self._policy = self.model
        return batch, stats

    def _zero_variance_share(self, batch: dict) -> float:
        totals = torch.tensor([s["total"] for s in batch["scores"]])
        keep = dynamic_sampling_filter(totals, group_size=self.cfg.group_size)
        return 1.0 - keep.float().mean().item()

    def _keep_informative(self, batch: dict) -> dict:
        G = self.cfg.group_size
        totals = torch.tensor([s["total"] for s in batch["scores"]])
        keep = dynamic_sampling_filter(totals, group_size=G).view(-1, G)[:, 0].tolist()
        groups = [g for g, k in enumerate(keep) if k]
        return _select_groups(batch, groups, G)

    # ------------------------------------------------------------------ update
    def step(self) -> dict:
        cfg, obj = self.cfg, self.cfg.objective
        t_start = time.perf_counter()
        batch, stats = self._collect()
        comps, G = batch["comps"], cfg.group_size
        n_groups = len(batch["problem_ids"])
        D.check_whole_groups([c.prompt_index for c in comps], G)  # so group advantages are rank-local
        metrics = self._rollout_metrics(batch) | stats
        if D.sum_across_ranks(n_groups, self.dist) == 0:
            self.step_index += 1
            return D.all_reduce_metrics(metrics | {"skipped": 1.0}, self.dist)
        totals = torch.tensor([s["total"] for s in batch["scores"]], dtype=torch.float32)
        adv = group_advantages(totals, G, **obj.advantage_kwargs()) if n_groups else totals
        counts = overlong_filter_mask([c.finish_reason for c in comps]) if obj.mask_truncated else None
        seqs, masks = _sequences(batch["prompts"], comps)
        old_logp = [torch.tensor(c.logprobs, dtype=torch.float32) for c in comps]
        ref_logp = self._logprobs(self.ref, seqs, masks) if self.ref is not None else None

        self.model.train()
        t_train = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 31 + self.step_index)
        agg: dict[str, list[float]] = {}
        for _ in range(cfg.epochs_per_rollout):
            for mb in D.minibatch_plan(n_groups, G, cfg.num_minibatches, self.dist, generator=gen):
                self._update(mb, seqs, masks, adv, old_logp, ref_logp, counts, agg)
        if self.ref is not None and cfg.ref_reset_every and (self.step_index + 1) % cfg.ref_reset_every == 0:
            self.ref = self._snapshot()
        t_end = time.perf_counter()
        n_tokens = sum(len(s) for s in seqs)
        metrics |= {k: sum(v) / len(v) for k, v in agg.items()}
        metrics |= {
            "lr": self.sched.get_last_lr()[0],
            "time/rollout": batch["t_rollout"], "time/scoring": batch["t_score"], "time/training": t_end - t_train,
            "time/step": t_end - t_start, "tokens_per_s": n_tokens * cfg.epochs_per_rollout / (t_end - t_train),
            "generated_tokens_per_s": sum(len(c.token_ids) for c in comps) / max(batch["t_rollout"], 1e-9),
        }
        self.last_samples = [
            {"prompt": batch["problems"][i].question, "gold": batch["problems"][i].gold, "completion": batch["texts"][i],
             "reward": batch["scores"][i]["total"], **{f"reward/{k}": v for k, v in batch["scores"][i].items() if k != "total"}}
            for i in range(min(len(comps), 2 * G)) if i % G < 2
        ]
        self.step_index += 1
        return D.all_reduce_metrics(metrics, self.dist)

    def _update(self, mb, seqs, masks, adv, old_logp, ref_logp, counts, agg) -> None:
        cfg, obj = self.cfg, self.cfg.objective
        seq_masks = [torch.ones(len(old_logp[i])) if counts is None else torch.full((len(old_logp[i]),), float(counts[i])) for i in mb]
        # global totals + loss × world: FSDP's gradient mean over ranks is then the single-process gradient
        total_tokens = D.sum_across_ranks(float(sum(m.sum() for m in seq_masks)), self.dist)
        total_seqs = D.sum_across_ranks(float(sum(1 for m in seq_masks if m.sum() > 0)), self.dist)
        packs = _pack(self.cfg, [seqs[i] for i in mb], [masks[i] for i in mb]) if mb else []
        n_passes = D.max_across_ranks(len(packs), self.dist)  # every rank joins every FSDP collective
        self.opt.zero_grad(set_to_none=True)
        for pack in packs:
            pack = pack.to(self.device)
            logp, entropy = token_logprobs(self.model, pack.input_ids, pack.targets, pack.positions, pack.doc_ids,
                                           with_entropy=True, mask=pack.loss_mask, temperature=self.loss_temperature)
            rows = [mb[j] for j in pack.seq_index]
            cur = pad_sequence(unpack_to_sequences(logp, pack, loss_tokens_only=True), batch_first=True)
            ent = pad_sequence(unpack_to_sequences(entropy, pack, loss_tokens_only=True), batch_first=True)
            old = pad_sequence([old_logp[i] for i in rows], batch_first=True).to(self.device)
            mask = pad_sequence([seq_masks[mb.index(i)] for i in rows], batch_first=True).to(self.device)
            ref = None if ref_logp is None else pad_sequence([ref_logp[i] for i in rows], batch_first=True).to(self.device)
            loss, stats = _policy_loss(cur, old, adv[rows].to(self.device), mask, obj, ref, total_tokens, total_seqs)
            aux = self.model.aux_loss()
            ((loss + (aux if aux is not None else 0.0)) * self.dist.world_size).backward()
            for k, v in stats.items():
                agg.setdefault(k, []).append(float(v))
            agg.setdefault("entropy", []).append(float((ent.detach() * mask).sum() / mask.sum().clamp(min=1)))
            agg.setdefault("logprob_mismatch", []).append(float(((cur.detach() - old).abs() * mask).sum() / mask.sum().clamp(min=1)))
        for _ in range(n_passes - len(packs)):
            D.dummy_backward(self.model, self.dist)
        grad_norm = D.clip_grad_norm(self.model, cfg.grad_clip)
        agg.setdefault("grad_norm", []).append(grad_norm)
        D.all_reduce_expert_loads(self.model, self.dist)  # global loads: the same bias update on every rank
        balance = self.model.expert_load_balance()  # loads counted since the last bias update
        if balance is not None:
            agg.setdefault("expert_load_max_over_mean", []).append(balance)
        self.opt.step()
        self.sched.step()
        self.model.update_router_bias(cfg.router_bias_gamma)

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

    def _rollout_metrics(self, batch: dict) -> dict:
        scores, comps = batch["scores"], batch["comps"]
        if not comps:
            return {}
        n = len(comps)
        out = {"reward": sum(s["total"] for s in scores) / n}
        for key in scores[0]:
            if key != "total":
                out[f"reward/{key}"] = sum(s[key] for s in scores) / n
        if "accuracy" in scores[0]:
            out["accuracy"] = out["reward/accuracy"]
        if "format" in scores[0]:
            out["format_rate"] = out["reward/format"]
        lengths = [len(c.token_ids) for c in comps]
        out["response_length"] = sum(lengths) / n
        out["response_length_max"] = float(max(lengths))
        out["truncated_rate"] = sum(c.finish_reason == "length" for c in comps) / n
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        # one process: checkpoint.save_checkpoint; torchrun: consolidated HF folder + sharded state
        return D.save_checkpoint(self.run_dir.path, self.step_index, self.model, self.opt, self.sched, self.dist,
                                 extra_state={"cursor": self.cursor, "order": self.order}, keep_last=2,
                                 tokenizer=self.tok)

    def resume(self) -> bool:
        found = load_latest_checkpoint(self.run_dir.path)
        if found is None:
            return False
        step, path = found
        extra = D.restore_checkpoint(path, self.model, self.opt, self.sched, self.dist)  # any process count
        self.cursor, self.order, self.step_index = extra["cursor"], list(extra["order"]), step
        if self.cfg.objective.beta > 0:
            self.ref = self._snapshot()  # a resumed run re-anchors KL at the restored policy
        return True


def _sequences(prompts: list[list[int]], comps) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt + completion token ids of each completion, and its loss mask (1 on the completion tokens)."""
    seqs = [prompts[c.prompt_index] + c.token_ids for c in comps]
    masks = [[0] * len(prompts[c.prompt_index]) + [1] * len(c.token_ids) for c in comps]
    return seqs, masks


def _pack(cfg: GRPOConfig, seqs, masks):
    """Rows as long as the longest sequence (attention cost grows with row length squared), as many rows
    per forward as the token budget allows."""
    row_len = max(len(s) for s in seqs)
    return pack_sequences(seqs, masks, row_len, rows_per_batch=max(1, cfg.micro_batch_tokens // row_len))


def _policy_loss(cur, old, adv, mask, obj: Objective, ref, total_tokens, total_seqs):
    return policy_loss(cur, old, adv, mask, ref_logp=ref, total_tokens=total_tokens, total_seqs=total_seqs,
                       **obj.loss_kwargs())


def _select_groups(batch: dict, groups: list[int], G: int) -> dict:
    keep_comps = [i for g in groups for i in range(g * G, (g + 1) * G)]
    remap = {g: j for j, g in enumerate(groups)}
    comps = []
    for i in keep_comps:
        c = copy.copy(batch["comps"][i])
        c.prompt_index = remap[i // G]
        comps.append(c)
    return dict(batch, problem_ids=[batch["problem_ids"][g] for g in groups], prompts=[batch["prompts"][g] for g in groups],
                comps=comps, texts=[batch["texts"][i] for i in keep_comps], problems=[batch["problems"][i] for i in keep_comps],
                scores=[batch["scores"][i] for i in keep_comps])


def _concat_rollouts(a: dict, b: dict, G: int) -> dict:
    shift = len(a["problem_ids"])
    comps = list(a["comps"])
    for c in b["comps"]:
        c = copy.copy(c)
        c.prompt_index += shift
        comps.append(c)
    out = {k: a[k] + b[k] for k in ("problem_ids", "prompts", "texts", "problems", "scores")}
    return dict(out, comps=comps, t_rollout=a["t_rollout"] + b["t_rollout"], t_score=a["t_score"] + b["t_score"])


def train_grpo(cfg: GRPOConfig, run_dir: RunDir, model, tokenizer, *, resume: bool = False, on_step=None,
               reward_models: dict | None = None, dist: D.DistInfo | None = None) -> Trainer:
    """Run cfg.steps GRPO steps (continuing a checkpointed run when resume=True); returns the Trainer.

    reward_models: learned reward models by the name their term has in cfg.rewards (R1's final stage)."""
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, model, tokenizer, run_dir, reward_models=reward_models, dist=dist)
    main = trainer.dist.is_main  # rank 0 alone writes logs (checkpoint saves are collective)
    if resume and trainer.resume() and main:
        trainer.run_dir = run_dir = RunDir(run_dir.path, resume_step=trainer.step_index - 1)  # drop logs past it
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
