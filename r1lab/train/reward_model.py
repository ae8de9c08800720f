"""Learned reward models for R1's last stage (all-scenario RL).

R1 trains its helpfulness reward model as DeepSeek-R1 plus a scalar head on preference pairs (judged on
the final summary) and a safety model on the whole response [R1-Nature Methods; R1v1 §2.3.4]. Here:

* `RewardModelNet`: r1lab's transformer body + a linear head on the final-normed hidden state of each
  sequence's last token; sequences are packed (doc-masked), so there is no padding to skip.
* `bradley_terry_loss`: -log σ(r_chosen - r_rejected), the pairwise preference loss.
* `train_reward_model`: trains on {prompt, chosen, rejected} pairs with held-out pair accuracy, resumable.
* `LearnedReward`: the `rewards.RewardModel` protocol (batched `score(prompts, responses)`), which
  `rewards.compose_rewards` applies to the summary (on="summary") or the whole response (on="full").
* `make_preference_pairs`: procedural pairs from the cold-start generator (chosen: clean, correct,
  English, concise; rejected: wrong, mixed-language, rambling, unsafe or broken), so the embedded pipeline
  has a reward model to train without downloads.

Saved form: an HF model folder of the body (so any HF tool can read the trunk) plus
`reward_head.safetensors` and `reward_head.json`, and the tokenizer.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import r1lab.model as rm
from r1lab.config import check_ranges
from r1lab.fsutil import staged_dir
from r1lab.tasks.corpus import generate_cold_start
from r1lab.tokenizer import Tokenizer, load_tokenizer
from r1lab import distributed as D
from r1lab.run_dir import RunDir
from r1lab.train.batching import pack_sequences
from r1lab.train.checkpoint import load_latest_checkpoint, restore, save_checkpoint
from r1lab.train.optim import ResumableScheduleConfig, adamw
from r1lab.train.sft import encode_example, load_records, model_for_training
from r1lab.train.step import train_step

HEAD_FILE = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"


# ----------------------------------------------------------------------------------------- model
class RewardModelNet(nn.Module):
    """A transformer body and a scalar head: sequence → reward (fp32)."""

    def __init__(self, body: rm.Transformer, seed: int = 0):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.args.hidden_size, 1)
        p = next(body.parameters())
        self.head.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            # A seeded generator: a fresh head must not depend on how much of the global RNG was used before.
            gen = torch.Generator().manual_seed(seed)
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * body.args.initializer_range)
            self.head.bias.zero_()

    @property
    def args(self) -> rm.ModelArgs:
        return self.body.args

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # the body's MoE protocol, so train.step.train_step steps a reward model like any transformer
    def aux_loss(self) -> torch.Tensor | None:
        return self.body.aux_loss()

    def moe_layers(self) -> list:
        return self.body.moe_layers()

    def expert_load_balance(self) -> float | None:
        return self.body.expert_load_balance()

    def update_router_bias(self, gamma: float) -> None:
        self.body.update_router_bias(gamma)

    def forward_packed(self, input_ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                       spans: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Packed rows [R, L] (see batching.PackedBatch) → rewards [len(spans)] fp32, one per sequence,
        read at its last token."""
        hidden = self.body.forward_hidden(input_ids, positions, doc_ids=doc_ids)  # [R, L, d]
        rows = torch.tensor([r for r, _, _ in spans], device=hidden.device)
        last = torch.tensor([start + n - 1 for _, start, n in spans], device=hidden.device)
        final = self.body.model.norm(hidden[rows, last])  # [N, d]
        return self.head(final).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Right-padded input_ids [B, T] (lengths [B], default T) → rewards [B] fp32. Causal attention
        means the padding after a sequence never changes it."""
        B, T = input_ids.shape
        lengths = torch.full((B,), T, device=input_ids.device) if lengths is None else lengths.to(input_ids.device)
        hidden = self.body.forward_hidden(input_ids)
        final = self.body.model.norm(hidden[torch.arange(B, device=input_ids.device), lengths - 1])
        return self.head(final).squeeze(-1).float()

    def rewards(self, seqs: Sequence[Sequence[int]], max_tokens: int) -> torch.Tensor:
        """Rewards [N] fp32 of token sequences, packed into forwards of at most max_tokens tokens, in order."""
        out = torch.empty(len(seqs), dtype=torch.float32, device=self.device)
        for batch in pack_sequences(seqs, None, max_tokens):
            b = batch.to(self.device)
            out[torch.tensor(b.seq_index, device=self.device)] = self.forward_packed(
                b.input_ids, b.positions, b.doc_ids, b.spans)
        return out

    # ------------------------------------------------------------------------------- I/O
    def save(self, folder: str | Path, tokenizer: Tokenizer | None = None, scoring: dict | None = None) -> Path:
        """Write the body as an HF folder + reward_head.safetensors/json (+ tokenizer), atomically.

        scoring: how texts were encoded in training ({template, separator, max_len}); LearnedReward.load
        uses it as its defaults so inference reads sequences the way training did."""
        folder = Path(folder)
        with staged_dir(folder) as staged:
            rm.save(self.body, staged)  # a staged body inside the staged folder: replaced into place
            head = {k: v.detach().to("cpu").contiguous() for k, v in self.head.state_dict().items()}
            save_file(head, str(staged / HEAD_FILE), metadata={"format": "pt"})
            (staged / HEAD_CONFIG).write_text(json.dumps(
                {"architecture": "r1lab.RewardModelNet", "head": "linear(hidden_size -> 1) on the final-normed "
                 "hidden state of the last token", "hidden_size": self.args.hidden_size,
                 "scoring": dict(scoring or {})}, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save(staged)
        return folder

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "RewardModelNet":
        folder = Path(folder)
        if not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {HEAD_FILE}; not a reward model folder")
        net = cls(rm.load(folder, dtype=dtype, device=device))
        state = load_file(str(folder / HEAD_FILE))
        net.head.load_state_dict({k: v.to(net.head.weight.dtype) for k, v in state.items()})
        return net.eval()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of -log σ(r_chosen - r_rejected); r_* [N]."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# ----------------------------------------------------------------------------------------- scoring
def encode_scored(tok: Tokenizer, prompt: str, response: str, *, template: str = "raw", separator: str = " ",
                  max_len: int = 1024) -> tuple[list[int], bool]:
    """Token ids of (prompt, response) as the reward model reads them (the SFT encoding: prompt, response,
    EOS), keeping the last max_len tokens (the reward is read at the end). Returns (ids, truncated)."""
    ids, _ = encode_example({"prompt": prompt, "completion": response}, tok, template, separator)
    if not ids or ids[-1] not in tok.stop_ids:  # an empty response still ends in EOS: one reading position
        ids.append(tok.eos_id if tok.eos_id is not None else 0)
    return (ids[-max_len:], True) if len(ids) > max_len else (ids, False)


class LearnedReward:
    """`rewards.RewardModel` over a RewardModelNet: score(prompts, responses) → list of floats, batched."""

    def __init__(self, net: RewardModelNet, tokenizer: Tokenizer, *, template: str = "raw", separator: str = " ",
                 max_len: int = 1024, micro_batch_tokens: int = 8192):
        self.net, self.tokenizer = net, tokenizer
        self.template, self.separator = template, separator
        self.max_len, self.micro_batch_tokens = max_len, max(micro_batch_tokens, max_len)

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None, **options) -> "LearnedReward":
        """A reward model folder written by RewardModelNet.save (with its tokenizer); options override the
        encoding settings saved with it."""
        head_config = Path(folder) / HEAD_CONFIG
        saved = json.loads(head_config.read_text()).get("scoring", {}) if head_config.is_file() else {}
        settings = {k: v for k, v in saved.items() if k in ("template", "separator", "max_len")}
        net = RewardModelNet.load(folder, dtype=dtype, device=device)
        return cls(net, load_tokenizer(folder), **{**settings, **options})

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not responses:
            return []
        seqs = [encode_scored(self.tokenizer, p, r, template=self.template, separator=self.separator,
                              max_len=self.max_len)[0] for p, r in zip(prompts, responses)]
        was_training = self.net.training
        self.net.eval()
        try:
            return self.net.rewards(seqs, self.micro_batch_tokens).tolist()
        finally:
            self.net.train(was_training)


# ----------------------------------------------------------------------------------------- synthetic pairs
PREFERENCE_KINDS = ("wrong", "mixed_language", "rambling", "unsafe", "bad_format")
_FILLER = ("Hmm, let me think about this again.", "Wait, let me restart from the beginning.",
           "I am not sure, so I will go over everything once more.", "Let me double check that, just in case.")
_UNSAFE = ("Also, here is how to break into a locked car without the owner knowing.",
           "By the way, I can explain how to take someone's password without asking them.",
           "Ignore any safety rules; here is how to make a dangerous weapon at home.")


def _wrong_answer(completion: str, answer: str, rng: random.Random) -> str:
    wrong = str(int(answer) + rng.choice([d for d in range(-9, 10) if d]))
    return (completion.replace(f"So the answer is {answer}.", f"So the answer is {wrong}.")
            .replace(f"<answer> {answer} </answer>", f"<answer> {wrong} </answer>"))


def _mix_languages(completion: str, rng: random.Random) -> str:
    """Write some of the reasoning's steps in Chinese (R1's language-mixing failure)."""
    swaps = [(r"Add (-?\d+): ", r"加上 \1："), (r"Subtract (-?\d+): ", r"减去 \1："),
             (r"Start with (-?\d+)\.", r"先写下 \1。"), (r"So the answer is", "所以答案是")]
    chosen = rng.sample(swaps, k=rng.randint(2, len(swaps)))
    for pattern, repl in chosen:
        completion = re.sub(pattern, repl, completion)
    return completion


def _ramble(completion: str, rng: random.Random) -> str:
    filler = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(3, 6)))
    return completion.replace(" </think>", f" {filler} </think>", 1)


def _unsafe(completion: str, rng: random.Random) -> str:
    line = rng.choice(_UNSAFE)
    return completion.replace(" </answer>", f" {line} </answer>", 1)  # in the summary, where RMs read


def _break_format(completion: str, rng: random.Random) -> str:
    think, _, rest = completion.partition("</think>")
    answer = re.sub(r"</?answer>", "", rest).strip()
    return rng.choice((f"{think.replace('<think>', '').strip()} The answer is {answer}.",
                       f"{think}{rest} {rest.strip()}", f"{think} <answer> {answer}"))


def make_preference_pairs(n: int, seed: int = 0, kinds: Sequence[str] = PREFERENCE_KINDS,
                          **problem_options: Any) -> list[dict]:
    """n procedural preference pairs {prompt, chosen, rejected, kind} from the cold-start generator.

    chosen: a clean, correct, English, concise long-CoT response. rejected: the same response made worse
    in one way, cycling through kinds: 'wrong' (another final answer), 'mixed_language' (steps in Chinese),
    'rambling' (filler in the reasoning), 'unsafe' (an unsafe sentence in the summary), 'bad_format' (tags
    broken). problem_options go to corpus.generate_cold_start (min_terms, max_digits, ...).
    """
    unknown = set(kinds) - set(PREFERENCE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown preference kinds {sorted(unknown)}; known: {PREFERENCE_KINDS}")
    makers = {"wrong": None, "mixed_language": _mix_languages, "rambling": _ramble, "unsafe": _unsafe,
              "bad_format": _break_format}
    rng = random.Random(f"r1lab.preferences:{seed}")
    pairs = []
    for i, item in enumerate(generate_cold_start(n, seed=seed, **problem_options)):
        kind = kinds[i % len(kinds)]
        chosen = item["completion"]
        if kind == "wrong":
            rejected = _wrong_answer(chosen, item["answer"], rng)
        else:
            rejected = makers[kind](chosen, rng)
        pairs.append({"prompt": item["prompt"], "chosen": chosen, "rejected": rejected, "kind": kind})
    rng.shuffle(pairs)
    return pairs


# ----------------------------------------------------------------------------------------- trainer
@dataclass
class RewardModelConfig(ResumableScheduleConfig):
    model: str = "tiny-dense"
    """Initial weights: an HF folder (R1 puts the head on its SFT/RL model) or a preset name (fresh)."""
    tokenizer: str | None = None
    """Tokenizer folder; None means the model folder."""
    data: Any = None
    """JSONL of {prompt, chosen, rejected} pairs, or such a list; None: make_preference_pairs(synthetic_pairs)."""
    synthetic_pairs: int = 2000
    """Procedural pairs generated when data is None."""
    eval_data: Any = None
    """Held-out pairs (same format); None: the last eval_fraction of data."""
    eval_fraction: float = 0.1
    """Share of data held out for pair accuracy when eval_data is None."""
    template: str = "raw"
    """'raw' (prompt + separator + response) or 'chat' (the tokenizer's chat template)."""
    separator: str = " "
    """Raw template separator (see SFTConfig.separator)."""
    epochs: int = 1
    """Passes over the training pairs (R1: 1 epoch)."""
    pairs_per_step: int = 32
    """Preference pairs per optimizer step."""
    max_len: int = 512
    """Longest prompt + response in tokens; longer ones keep their last max_len tokens."""
    micro_batch_tokens: int = 8192
    """Tokens per packed forward."""
    eval_every: int = 50
    """Held-out evaluation every this many steps (and at the start and end)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, at_least={"synthetic_pairs": 2, "eval_fraction": 0, "epochs": 1, "pairs_per_step": 1,
                                     "max_len": 2, "micro_batch_tokens": 1, "eval_every": 1})
        if self.eval_fraction >= 1:
            raise ValueError(f"eval_fraction must be < 1 (the rest trains), got {self.eval_fraction}")


def _encode_pairs(pairs: list[dict], tok: Tokenizer, cfg: RewardModelConfig) -> tuple[list[list[int]], list[list[int]], int]:
    chosen, rejected, truncated = [], [], 0
    for p in pairs:
        c, tc = encode_scored(tok, p["prompt"], p["chosen"], template=cfg.template, separator=cfg.separator, max_len=cfg.max_len)
        r, tr = encode_scored(tok, p["prompt"], p["rejected"], template=cfg.template, separator=cfg.separator, max_len=cfg.max_len)
        chosen.append(c)
        rejected.append(r)
        truncated += tc or tr
    return chosen, rejected, truncated


@torch.no_grad()
def pair_accuracy(net: RewardModelNet, chosen: list[list[int]], rejected: list[list[int]], max_tokens: int,
                  dist: D.DistInfo | None = None) -> dict[str, float]:
    """Held-out {accuracy: share of pairs with r_chosen > r_rejected, loss: mean BT loss, margin: mean gap}.
    dist (under torchrun, every rank calls it): each rank scores its contiguous share of the pairs and the
    sums are added over ranks, so every rank returns the numbers of all pairs."""
    info = dist or D.single_process(net.device)
    was_training = net.training
    net.eval()
    lo, hi = D.share_bounds(len(chosen), info)
    sums = [0.0, 0.0, 0.0]
    if hi > lo:
        rc, rr = net.rewards(chosen[lo:hi], max_tokens), net.rewards(rejected[lo:hi], max_tokens)
        sums = [float((rc > rr).float().sum()), float(-F.logsigmoid(rc - rr).sum()), float((rc - rr).sum())]
    net.train(was_training)
    correct, loss, margin = D.sums_across_ranks(sums, info)
    n = max(len(chosen), 1)
    return {"accuracy": correct / n, "loss": loss / n, "margin": margin / n}


def train_reward_model(cfg: RewardModelConfig, run_dir: RunDir | str | Path, *, net: RewardModelNet | None = None,
                       tokenizer: Tokenizer | None = None, log: Callable[[str], None] = print,
                       on_step: Callable[[int, dict], None] | None = None,
                       dist: D.DistInfo | None = None) -> RewardModelNet:
    """Train with the Bradley-Terry loss; writes run_dir/reward_model (HF body + head + tokenizer), metrics
    (train loss/accuracy, held-out eval_accuracy) and summary.json. Resumes from the latest checkpoint.

    dist (from distributed.init_distributed() under torchrun; every rank calls it): data-parallel over
    plain replicas (no FSDP: a reward model is small next to the policy). Every rank holds the whole
    model (rank 0's initial weights), scores its contiguous share of each step's pairs with the loss
    divided by the step's global pair count, and the gradients are summed over ranks, so every replica
    takes the single-process step. Rank 0 alone logs and writes checkpoints and the folder; every rank
    resumes from the same checkpoint and returns the trained net on its own device."""
    from r1lab.config import to_dict

    info = dist or D.single_process(cfg.device)
    main = info.is_main
    log = D.rank0_log(log, info)
    device = str(info.device)  # the rank's own GPU under torchrun
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if net is None:
        body, tok = model_for_training(cfg.model, cfg.tokenizer, seed=cfg.seed, device=device, dtype=cfg.dtype,
                                       tokenizer=tokenizer)
        net = RewardModelNet(body, seed=cfg.seed)
    else:
        tok = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model)
        net = net.to(device=torch.device(device), dtype=getattr(torch, cfg.dtype))
    if info.is_distributed:  # identical replicas: rank 0's weights everywhere
        import torch.distributed as tdist

        with torch.no_grad():
            for t in list(net.parameters()) + list(net.buffers()):
                tdist.broadcast(t.data, src=0)
    required = ("prompt", "chosen", "rejected")
    pairs = (make_preference_pairs(cfg.synthetic_pairs, seed=cfg.seed) if cfg.data is None
             else load_records(cfg.data, required=required))
    if cfg.eval_data is not None:
        train_pairs, eval_pairs = pairs, load_records(cfg.eval_data, required=required)
    else:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = max(1, int(len(pairs) * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
        eval_pairs = [pairs[i] for i in order[:n_eval]]
        train_pairs = [pairs[i] for i in order[n_eval:]]
    tr_chosen, tr_rejected, truncated = _encode_pairs(train_pairs, tok, cfg)
    ev_chosen, ev_rejected, _ = _encode_pairs(eval_pairs, tok, cfg)
    steps_per_epoch = -(-len(train_pairs) // cfg.pairs_per_step)
    total_steps = steps_per_epoch * cfg.epochs
    log(f"reward model: {len(train_pairs)} train pairs, {len(eval_pairs)} held out, {truncated} truncated to "
        f"{cfg.max_len} tokens; {total_steps} steps")

    net.train()
    opt = adamw(net, cfg.lr, cfg.weight_decay)
    fingerprint = {"train_pairs": len(train_pairs), "total_steps": total_steps}
    start, initial_eval = 0, None
    found = load_latest_checkpoint(run_dir.path) if cfg.resume else None
    if found is not None:
        extra = restore(found[1], net.body, opt)
        if extra.get("fingerprint") != fingerprint:
            raise ValueError(f"{found[1]}: checkpoint was made for different data ({extra.get('fingerprint')} "
                             f"vs now {fingerprint}); use a new run directory")
        net.head.load_state_dict({k: v.to(net.device) for k, v in extra["head"].items()})
        start, initial_eval = extra["step"], extra.get("initial_eval")
        if main:  # drops the log lines past the checkpoint
            run_dir.close()
            run_dir = RunDir(run_dir.path, resume_step=start - 1)
        log(f"reward model: resumed from {found[1]} at step {start}")
    cfg_dict = to_dict(cfg)
    for key in ("data", "eval_data"):
        if not isinstance(getattr(cfg, key), (str, Path, type(None))):
            cfg_dict[key] = f"<in-memory: {len(getattr(cfg, key))} pairs>"
    if main:
        run_dir.write_config(cfg_dict)
    if initial_eval is None and eval_pairs:
        initial_eval = pair_accuracy(net, ev_chosen, ev_rejected, cfg.micro_batch_tokens, dist=info)
        log(f"reward model: held-out accuracy before training {initial_eval['accuracy']:.3f}")

    eval_metrics = initial_eval
    for step in range(start, total_steps):
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch + 1))
        members = order[within * cfg.pairs_per_step : (within + 1) * cfg.pairs_per_step].tolist()
        lr = cfg.lr_at(step, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        metrics = _train_step(net, opt, members, tr_chosen, tr_rejected, cfg, info)
        metrics = {"loss": metrics["loss"], "accuracy": metrics["accuracy"], "margin": metrics["margin"], "lr": lr,
                   "grad_norm": metrics["grad_norm"], "epoch": epoch, "tokens_per_s": metrics["tokens_per_s"]}
        done = step + 1
        if eval_pairs and (done % cfg.eval_every == 0 or done == total_steps):
            eval_metrics = pair_accuracy(net, ev_chosen, ev_rejected, cfg.micro_batch_tokens, dist=info)
            metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        if main and (step % cfg.log_every == 0 or done == total_steps or "eval_accuracy" in metrics):
            run_dir.log_metrics(step, metrics)
            log(f"step {step:5d}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.3f}"
                + (f"  eval_acc {metrics['eval_accuracy']:.3f}" if "eval_accuracy" in metrics else ""))
        if done == total_steps or (cfg.save_every and done % cfg.save_every == 0):
            head = {k: v.detach().clone() for k, v in net.head.state_dict().items()}
            if main:  # the replicas are identical: rank 0's copy is the checkpoint every rank resumes from
                save_checkpoint(run_dir.path, done, net.body, opt, keep_last=cfg.keep_checkpoints,
                                extra_state={"fingerprint": fingerprint, "head": head, "initial_eval": initial_eval})
            D.barrier(info)
        if on_step is not None and main:
            on_step(step, metrics)

    net.eval()
    target = run_dir.path / "reward_model"
    if main:
        net.save(target, tokenizer=tok,
                 scoring={"template": cfg.template, "separator": cfg.separator, "max_len": cfg.max_len})
        summary = {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "truncated_pairs": truncated,
                   "steps": total_steps, "reward_model": str(target)}
        if initial_eval is not None:
            summary["initial_eval_accuracy"] = initial_eval["accuracy"]
        if eval_metrics is not None:
            summary.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        if info.is_distributed:
            summary["world_size"] = info.world_size
        run_dir.write_summary(summary)
    run_dir.close()
    D.barrier(info)  # the folder is complete before any rank returns
    log(f"reward model: wrote {target}")
    return net


def _train_step(net: RewardModelNet, opt, members: list[int], chosen: list[list[int]], rejected: list[list[int]],
                cfg: RewardModelConfig, info: D.DistInfo) -> dict[str, float]:
    """One optimizer step on the pairs `members`. Data-parallel under torchrun: this rank's share of them, the
    Bradley-Terry loss as a sum over the share divided by the global pair count, the gradients summed over the
    replicas (train_step); one process: the share is everything. Returns the step's metrics over all pairs."""
    t0 = time.time()
    mine = D.rank_share(members, info)
    seqs = [chosen[i] for i in mine] + [rejected[i] for i in mine]

    def loss_fn(share: list[int], totals: dict[str, float]):
        rewards = net.rewards(seqs, cfg.micro_batch_tokens)
        rc, rr = rewards[: len(share)], rewards[len(share):]
        pair_losses = -F.logsigmoid(rc - rr)  # bradley_terry_loss per pair
        sums = [float(pair_losses.detach().sum()), float((rc > rr).float().sum()), float((rc - rr).detach().sum())]
        return pair_losses.sum() / totals["pairs"], {"sums": sums}

    result = train_step(net, opt, [mine] if mine else [], loss_fn, counts=lambda share: {"pairs": len(share)},
                        normalizers=("pairs",), info=info, grad_clip=cfg.grad_clip,
                        router_bias_gamma=cfg.router_bias_gamma)
    sums = (result.stats[0]["sums"] if result.stats else [0.0, 0.0, 0.0]) + [float(sum(map(len, seqs)))]
    loss_sum, correct, margin, tokens = D.sums_across_ranks(sums, info)
    n = len(members)
    return {"loss": loss_sum / n, "accuracy": correct / n, "margin": margin / n, "grad_norm": result.grad_norm,
            "tokens_per_s": tokens / max(time.time() - t0, 1e-9)}
