"""Supervised fine-tuning: R1's cold start (stage 1), the rejection-sampling SFT (stage 3) and distillation.

Each example is a prompt and a response; the loss is the next-token cross-entropy on the response tokens
only (the prompt is context, not something to imitate). Examples are packed several to a row with
positions restarting per example and block-causal (doc-masked) attention, so no compute goes to padding
and examples never see each other; the packed loss equals the unpacked one.

Step structure: every epoch the examples are shuffled (seeded) and cut into optimizer steps of about
`tokens_per_step` tokens; each step is packed into micro-batches of at most `micro_batch_tokens` tokens,
whose gradients accumulate. The loss of a step is the mean over all of its response tokens, however they
fall into micro-batches (gradient accumulation by tokens, not by micro-batch). The plan is a pure function
of (data, seed), so a resumed run replays exactly the steps it had left.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import r1lab.model as rm
from r1lab.config import ConfigError, check_ranges
from r1lab.errors import DataFileError
from r1lab.tokenizer import Tokenizer, load_tokenizer
from r1lab import distributed as D
from r1lab.run_dir import RunDir
from r1lab.train.batching import PackedBatch, pack_sequences
from r1lab.train.checkpoint import (
    load_latest_checkpoint,
    publish_checkpoint_model,
    restore_checkpoint,
    save_checkpoint,
)
from r1lab.train.logprobs import logprobs_from_hidden, mtp_loss_sums
from r1lab.train.optim import ResumableScheduleConfig, adamw
from r1lab.train.parallel import shard_model
from r1lab.train.step import train_step


@dataclass
class SFTConfig(ResumableScheduleConfig):
    model: str = "tiny-dense"
    """HF model folder to fine-tune, or a preset name (fresh weights, vocabulary sized to the tokenizer)."""
    tokenizer: str | None = None
    """Tokenizer folder; None means the model folder."""
    data: Any = None
    """A JSONL file of records {prompt, completion} or {messages: [{role, content}, ...]}, or such a list."""
    template: str = "raw"
    """'raw': prompt + separator + completion as given (then EOS); 'chat': the tokenizer's chat template
    (a {prompt, completion} record becomes one user turn and one assistant turn)."""
    separator: str = " "
    """Raw template: text put between prompt and completion when neither side already has whitespace
    there (r1lab's corpus writes 'Assistant: <think>...'; a chat-rendered prompt ends in a newline)."""
    epochs: int = 2
    """Passes over the data (R1 stage 3: 2 epochs)."""
    weight_decay: float = 0.1
    micro_batch_tokens: int = 4096
    """Token budget of one packed forward (one row); must cover max_len."""
    tokens_per_step: int = 16384
    """Tokens (prompt + response) per optimizer step; micro-batches accumulate until they reach it."""
    max_len: int = 1024
    """Longest example in tokens; longer ones are dropped or truncated (see overlong), and counted."""
    overlong: str = "drop"
    """'drop' too-long examples, or 'truncate' their response (an example whose prompt alone does not fit
    is always dropped)."""
    mtp_weight: float = 0.1
    """Weight of the multi-token-prediction loss when the model has MTP modules (0 disables)."""
    chunk_size: int = 1024
    """Tokens per chunk of the output head (bounds the memory of the logits)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward (less memory, ~1/3 more compute)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.template not in ("raw", "chat"):
            raise ConfigError(f"template must be 'raw' or 'chat', got {self.template!r}")
        if self.overlong not in ("drop", "truncate"):
            raise ConfigError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        check_ranges(self, at_least={"epochs": 1, "tokens_per_step": 1, "max_len": 2, "mtp_weight": 0,
                                     "chunk_size": 1})
        if self.micro_batch_tokens < self.max_len:
            raise ConfigError(f"micro_batch_tokens={self.micro_batch_tokens} must be >= max_len={self.max_len}")


# ----------------------------------------------------------------------------------------- data
def load_records(data: Any, *, required: Sequence[str] = ()) -> list[dict]:
    """Records from a JSONL path or a list of dicts; errors name the file, the line and the field."""
    if data is None:
        raise ConfigError("no training data: set data= to a JSONL file or a list of records")
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file not found")
        records, where = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            where.append(f"{path}:{n}")
    else:
        records = list(data)
        where = [f"record {i}" for i in range(len(records))]
    for rec, at in zip(records, where):
        if not isinstance(rec, dict):
            raise DataFileError(f"{at}: expected a JSON object, got {type(rec).__name__}")
        for key in required:
            if not isinstance(rec.get(key), str):
                raise DataFileError(f"{at}: field {key!r} must be a string")
        if not required and not ("messages" in rec or ("prompt" in rec and "completion" in rec)):
            raise DataFileError(f"{at}: needs 'prompt' and 'completion' strings, or 'messages'")
    if not records:
        raise DataFileError(f"{data if isinstance(data, (str, Path)) else 'data'}: no records")
    return records


def join_prompt(prompt: str, completion: str, separator: str = " ") -> str:
    """The text between prompt and completion in the raw template: separator unless either side already
    has whitespace at the seam."""
    if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace():
        return ""
    return separator


def _chat_pieces(messages: list[dict], tok: Tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation: every assistant turn is trained, the rest is context."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"message {i}: needs 'role' and string 'content'")
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError(f"message {i}: the chat template does not render this conversation as a growing "
                             "prefix (e.g. it rewrites earlier turns); train on {prompt, completion} instead")
        reply = full[len(prefix):]
        trailing = reply[len(reply.rstrip()):]  # the newline after an end-of-turn token is never generated
        pieces += [(prefix[len(done):], False), (reply[: len(reply) - len(trailing)], True), (trailing, False)]
        done = full
    if not any(trained and text for text, trained in pieces):
        raise ValueError("conversation has no assistant turn to train on")
    return pieces


def encode_example(record: dict, tok: Tokenizer, template: str = "raw", separator: str = " ") -> tuple[list[int], list[int]]:
    """One record → (token ids, loss mask): mask 1 on response tokens (and the EOS that ends them).

    Pieces are encoded separately so the prompt's tokens are exactly what the rollout engine will see.
    An EOS is appended when the response does not already end in a stop token.
    """
    if "messages" in record:
        if template != "chat":
            raise ValueError("a {messages} record needs template='chat'")
        pieces = _chat_pieces(list(record["messages"]), tok)
    elif template == "chat":
        pieces = _chat_pieces([{"role": "user", "content": record["prompt"]},
                               {"role": "assistant", "content": record["completion"]}], tok)
    else:
        prompt, completion = record["prompt"], record["completion"]
        pieces = [(prompt, False), (join_prompt(prompt, completion, separator) + completion, True)]
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in pieces:
        if text:
            piece = tok.encode(text)
            ids += piece
            mask += [int(trained)] * len(piece)
    last_trained = max((i for i, m in enumerate(mask) if m), default=-1)
    if last_trained >= 0 and ids[last_trained] not in tok.stop_ids and tok.eos_id is not None:
        ids.insert(last_trained + 1, tok.eos_id)
        mask.insert(last_trained + 1, 1)
    return ids, mask


@dataclass
class EncodedData:
    seqs: list[list[int]]
    masks: list[list[int]]
    dropped: int
    truncated: int


def encode_dataset(records: list[dict], tok: Tokenizer, cfg: SFTConfig) -> EncodedData:
    """Encode every record and apply max_len (drop or truncate), counting what happened."""
    seqs, masks, dropped, truncated = [], [], 0, 0
    for rec in records:
        ids, mask = encode_example(rec, tok, cfg.template, cfg.separator)
        if len(ids) > cfg.max_len:
            first_trained = mask.index(1) if 1 in mask else len(mask)
            if cfg.overlong == "drop" or first_trained >= cfg.max_len:
                dropped += 1
                continue
            ids, mask = ids[: cfg.max_len], mask[: cfg.max_len]
            truncated += 1
        if sum(mask[1:]) == 0:  # nothing to learn (empty response): a zero-token example
            dropped += 1
            continue
        seqs.append(ids)
        masks.append(mask)
    if not seqs:
        raise ValueError(f"no example fits max_len={cfg.max_len} ({dropped} dropped)")
    return EncodedData(seqs, masks, dropped, truncated)


def plan_steps(lengths: Sequence[int], tokens_per_step: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) of every optimizer step: a seeded shuffle per epoch, cut into runs of at
    least tokens_per_step tokens (the epoch's last step may be smaller)."""
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed * 1009 + epoch)).tolist()
        current, tokens = [], 0
        for i in order:
            current.append(i)
            tokens += lengths[i]
            if tokens >= tokens_per_step:
                steps.append((epoch, current))
                current, tokens = [], 0
        if current:
            steps.append((epoch, current))
    return steps


# ----------------------------------------------------------------------------------------- loss
def sft_loss_sums(model, batch: PackedBatch, *, chunk_size: int = 1024, with_mtp: bool = False) -> dict[str, torch.Tensor]:
    """Summed response-token cross-entropy of one packed batch (and the MTP sum when asked).

    Returns {"ce_sum": 0-dim fp32, "tokens": number of response tokens, "mtp_sum", "mtp_tokens"}; the
    mean loss of any set of batches is Σ ce_sum / Σ tokens, identical packed or not.
    """
    hidden = model.forward_hidden(batch.input_ids, batch.positions, doc_ids=batch.doc_ids)
    logp = logprobs_from_hidden(model, hidden, batch.targets, chunk_size=chunk_size, mask=batch.loss_mask)
    out = {"ce_sum": -(logp * batch.loss_mask).sum(), "tokens": batch.loss_mask.sum()}
    if with_mtp and len(model.mtp):
        out["mtp_sum"], out["mtp_tokens"] = mtp_loss_sums(model, hidden, batch.input_ids, positions=batch.positions,
                                                          doc_ids=batch.doc_ids, loss_mask=batch.loss_mask,
                                                          chunk_size=chunk_size)
    return out


# ----------------------------------------------------------------------------------------- model
def model_for_training(spec: str, tokenizer_spec: str | None, *, seed: int, device, dtype: str, model: Any = None,
                       tokenizer: Tokenizer | None = None, preset_overrides: dict | None = None):
    """(model, tokenizer) to train: the given objects (moved to device and dtype), else loaded from an HF
    folder or built fresh from a preset (r1lab.model.load_model_and_tokenizer)."""
    if model is None:
        return rm.load_model_and_tokenizer(spec, tokenizer=tokenizer or tokenizer_spec, device=device, dtype=dtype,
                                           seed=seed, preset_overrides=preset_overrides)
    if tokenizer is None:
        source = tokenizer_spec or (spec if Path(spec).is_dir() else None)
        if source is None:
            raise ConfigError(f"model {spec!r} is a preset: give a tokenizer folder (tokenizer=...)")
        tokenizer = load_tokenizer(source)
    model = model.to(device=torch.device(device), dtype=getattr(torch, dtype))
    rm.check_vocabulary(model, tokenizer)
    return model, tokenizer


def _config_for_yaml(cfg: SFTConfig) -> dict:
    from r1lab.config import to_dict

    d = to_dict(cfg)
    if not isinstance(cfg.data, (str, Path, type(None))):
        d["data"] = f"<in-memory: {len(cfg.data)} records>"
    return d


# ----------------------------------------------------------------------------------------- trainer
def _pad_to(batch: PackedBatch, length: int) -> PackedBatch:
    """Right-pad a one-row-or-more packed batch to `length` columns with padding (doc id -1, no target, no
    loss): the model's block-causal mask keeps real tokens from seeing it."""
    extra = length - batch.input_ids.shape[1]
    if extra <= 0:
        return batch
    pad = {"input_ids": 0, "positions": 0, "doc_ids": -1, "targets": -1, "loss_mask": False}
    t = {k: F.pad(getattr(batch, k), (0, extra), value=v) for k, v in pad.items()}
    return PackedBatch(**t, seq_index=batch.seq_index, spans=batch.spans)


def train_sft(cfg: SFTConfig, run_dir: RunDir | str | Path, model=None, tokenizer: Tokenizer | None = None,
              *, log: Callable[[str], None] = print, on_step: Callable[[int, dict], None] | None = None,
              dist: D.DistInfo | None = None):
    """Fine-tune on cfg.data; returns the trained model (eval mode) and writes run_dir/model (+ tokenizer).

    model/tokenizer: objects to train in place instead of loading cfg.model / cfg.tokenizer.
    on_step(step, metrics): called after every optimizer step (and its checkpoint); raising in it stops
    the run the way a crash would (tests use it).
    With cfg.resume, a run directory that holds a checkpoint continues from it exactly.

    dist (from distributed.init_distributed() under torchrun): data-parallel with FSDP2. The model is
    loaded on dist.device and sharded in place; every rank takes its share of each step's examples (the
    same global steps as one process), the loss is normalized by the global response-token count, so the
    gradient is the single-process one. Rank 0 alone logs (log, metrics, TensorBoard, on_step, summary)
    and writes run_dir/model as one consolidated Hugging Face folder; checkpoints add the sharded
    model+optimizer state (distributed.save_checkpoint) and resume with any number of processes. Every
    rank returns the *sharded* model: use distributed.gathered_for_rollout / save_consolidated with it.
    """
    info = dist or D.single_process(cfg.device)
    main = info.is_main
    log = D.rank0_log(log, info)
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    device = info.device
    model, tok = model_for_training(cfg.model, cfg.tokenizer, seed=cfg.seed, device=str(device), dtype=cfg.dtype,
                                    model=model, tokenizer=tokenizer)
    data = encode_dataset(load_records(cfg.data), tok, cfg)
    lengths = [len(s) for s in data.seqs]
    plan = plan_steps(lengths, cfg.tokens_per_step, cfg.epochs, cfg.seed)
    total_steps = len(plan)
    log(f"sft: {len(data.seqs)} examples ({data.dropped} dropped, {data.truncated} truncated as over "
        f"max_len={cfg.max_len}), {sum(lengths):,} tokens, {total_steps} steps over {cfg.epochs} epochs"
        + (f", {info.world_size} processes" if info.is_distributed else ""))

    if info.is_distributed:  # before the optimizer sees the parameters
        shard_model(model, info)
    model.train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    fingerprint = {"examples": len(data.seqs), "tokens": sum(lengths), "total_steps": total_steps}
    start, first_loss, last_loss = 0, None, None
    found = load_latest_checkpoint(run_dir.path) if cfg.resume else None
    last_checkpoint = found[1] if found is not None else None
    if found is not None:
        extra = restore_checkpoint(found[1], model, opt, None, info)  # a sharded one: any process count
        if extra.get("fingerprint") != fingerprint:
            raise ValueError(f"{found[1]}: checkpoint was made for different data or settings "
                             f"({extra.get('fingerprint')} vs now {fingerprint}); use a new run directory")
        start = extra["step"]
        first_loss, last_loss = extra.get("first_loss"), extra.get("last_loss")
        if main:  # drops the log lines past the checkpoint
            run_dir.close()
            run_dir = RunDir(run_dir.path, resume_step=start - 1)
        log(f"sft: resumed from {found[1]} at step {start}")
    if main:
        run_dir.write_config(_config_for_yaml(cfg))

    use_mtp = cfg.mtp_weight > 0 and len(model.mtp) > 0
    # Sharded: every pass must run every MTP depth (an FSDP unit skipped on one rank would desynchronize
    # the collectives), so a row too short for the deepest one is padded (a few pad tokens, MoE routes them).
    min_len = len(model.mtp) + 2 if use_mtp and info.is_distributed else 0
    for step in range(start, total_steps):
        t0 = time.time()
        epoch, members = plan[step]
        lr = cfg.lr_at(step, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        mine = D.rank_share(members, info) if info.is_distributed else members
        batches = [_pad_to(b, min_len).to(device) for b in pack_sequences(
            [data.seqs[i] for i in mine], [data.masks[i] for i in mine], cfg.micro_batch_tokens)] if mine else []

        def loss_fn(batch: PackedBatch, totals: dict[str, float]):
            sums = sft_loss_sums(model, batch, chunk_size=cfg.chunk_size, with_mtp=use_mtp)
            # Normalizing by the step's response tokens makes the accumulated gradient that of one big batch.
            loss = sums["ce_sum"] / max(totals["tokens"], 1)
            if use_mtp:
                loss = loss + cfg.mtp_weight * sums["mtp_sum"] / max(totals["tokens"], 1)
            return loss, {k: v.detach() for k, v in sums.items() if k != "tokens"}

        result = train_step(model, opt, batches, loss_fn, counts=lambda b: {"tokens": int(b.loss_mask.sum())},
                            normalizers=("tokens",), info=info, grad_clip=cfg.grad_clip,
                            router_bias_gamma=cfg.router_bias_gamma, dummy_mtp=use_mtp)
        step_tokens, grad_norm, balance = int(result.totals["tokens"]), result.grad_norm, result.expert_balance
        ce_total = mtp_total = mtp_count = torch.zeros((), device=device)  # summed on device: one sync per step
        for sums in result.stats:
            ce_total = ce_total + sums["ce_sum"]
            if use_mtp:
                mtp_total = mtp_total + sums["mtp_sum"]
                mtp_count = mtp_count + sums["mtp_tokens"]
        ce_sum, n_tokens, mtp_sum, mtp_n = D.sums_across_ranks(
            [float(ce_total), sum(b.num_tokens for b in batches), float(mtp_total), float(mtp_count)], info)
        n_tokens = int(n_tokens)
        step_loss = ce_sum / max(step_tokens, 1)
        first_loss = step_loss if first_loss is None else first_loss
        last_loss = step_loss
        metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "epoch": epoch,
                   "tokens": n_tokens, "response_tokens": step_tokens, "tokens_per_s": n_tokens / max(time.time() - t0, 1e-9)}
        if use_mtp:
            metrics["mtp_loss"] = mtp_sum / max(mtp_n, 1.0)
        if balance is not None:
            metrics["expert_load_max_over_mean"] = balance
        done = step + 1
        if main and (step % cfg.log_every == 0 or done == total_steps):
            run_dir.log_metrics(step, metrics)
            log(f"step {step:5d}  loss {step_loss:.4f}  grad_norm {grad_norm:.2f}  lr {lr:.2e}  "
                f"{metrics['tokens_per_s']:.0f} tok/s")
        if done == total_steps or (cfg.save_every and done % cfg.save_every == 0):
            extra_state = {"fingerprint": fingerprint, "first_loss": first_loss, "last_loss": last_loss}
            last_checkpoint = save_checkpoint(run_dir.path, done, model, opt, None, extra_state,
                                              keep_last=cfg.keep_checkpoints, tokenizer=tok, info=info)
        if on_step is not None and main:
            on_step(step, metrics)

    model.eval()
    # the last step always checkpoints: its weights become the run's model folder (linked, not written again)
    target = publish_checkpoint_model(last_checkpoint, run_dir.path / "model", info)
    if main:
        run_dir.write_summary({"examples": len(data.seqs), "dropped_overlong": data.dropped,
                               "truncated_overlong": data.truncated, "steps": total_steps, "epochs": cfg.epochs,
                               "first_loss": first_loss, "final_loss": last_loss, "model": str(target),
                               "parameters": model.num_parameters()})
    run_dir.close()
    D.barrier(info)  # summary.json too (distill reads it on every rank) before any rank returns
    log(f"sft: wrote {target}")
    return model
