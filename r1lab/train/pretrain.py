"""`r1lab pretrain`: build r1lab's analog of DeepSeek-V3-Base from the procedural corpus.

Steps: generate the bilingual chain-sum corpus → train a byte-level BPE tokenizer on it → pack the
documents into fixed-length rows (document packing without cross-document masking, as V3 pre-training
does) → next-token training with AdamW, warmup + cosine LR, grad clipping, the MoE bias update and the
MTP loss → an HF checkpoint folder with the tokenizer beside it.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import r1lab.model as rm
from r1lab.config import check_ranges
from r1lab.tasks.corpus import CorpusConfig, generate_corpus, pretrain_texts
from r1lab.tokenizer import Tokenizer, train_bpe
from r1lab import distributed as D
from r1lab.run_dir import RunDir
from r1lab.train.checkpoint import save_model_folder
from r1lab.train.logprobs import logprobs_from_hidden, mtp_loss_sums
from r1lab.train.optim import ScheduleConfig, adamw
from r1lab.train.parallel import shard_model
from r1lab.train.step import train_step


@dataclass
class PretrainConfig(ScheduleConfig):
    model: dict = field(default_factory=lambda: dict(rm.PRESETS["r1-tiny"]))
    """ModelArgs fields (vocab_size is set from the trained tokenizer)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Mixture of the procedural corpus."""
    n_docs: int = 60000
    """Documents generated for training."""
    vocab_size: int = 640
    """BPE vocabulary size (digits stay single tokens)."""
    seq_len: int = 256
    """Tokens per training row."""
    batch_size: int = 32
    """Rows per optimizer step."""
    steps: int = 1500
    """Optimizer steps."""
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1  # V3: 0.1
    dtype: str = "float32"
    """float32, or bfloat16 (autocast matmuls over fp32 master weights; CUDA only)."""
    log_every: int = 50
    mtp_weight: float = 0.3
    """λ of the MTP loss (V3: 0.3 early in training)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, at_least={"n_docs": 1, "seq_len": 2, "batch_size": 1, "steps": 1, "mtp_weight": 0})


def build_tokenizer(cfg: PretrainConfig) -> Tokenizer:
    return train_bpe(pretrain_texts(cfg.corpus, n_docs=4000, seed=cfg.seed + 1), vocab_size=cfg.vocab_size)


def pack_rows(docs: list[str], tok: Tokenizer, seq_len: int, seed: int) -> torch.Tensor:
    """Shuffle documents, concatenate their tokens, cut into rows [N, seq_len + 1] (inputs + shifted targets)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for ids in tok.encode_batch([docs[i] for i in order]):
        stream.extend(ids)
    n = (len(stream) - 1) // seq_len
    data = torch.tensor(stream[: n * seq_len + 1])
    return torch.stack([data[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])


def pretrain(cfg: PretrainConfig, run_dir: RunDir, log=print, dist: D.DistInfo | None = None) -> Path:
    """Train the base model; write it (with its tokenizer) to run_dir/model, metrics to metrics.jsonl and the
    resolved config to config.yaml.

    dist (from distributed.init_distributed() under torchrun): data-parallel with FSDP2. Every rank builds
    the same tokenizer and rows (seeded; checked identical), draws the same global batch of batch_size rows
    and trains on its share of them; the loss is scaled so the gradient is the single-process one. Rank 0
    alone logs and writes run_dir/model (one consolidated Hugging Face folder)."""
    info = dist or D.single_process(cfg.device)
    main = info.is_main
    log = D.rank0_log(log, info)
    if main:
        run_dir.write_config(cfg)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tok = build_tokenizer(cfg)
    docs = generate_corpus(cfg.corpus, n_docs=cfg.n_docs, seed=cfg.seed)
    rows = pack_rows(docs, tok, cfg.seq_len, cfg.seed)
    if info.is_distributed:
        _check_same_rows(rows, info)
    log(f"corpus: {len(docs)} docs, {rows.numel():,} tokens in {len(rows)} rows; vocab {tok.vocab_size} ({time.time() - t0:.0f}s)")

    args = rm.ModelArgs(**{**cfg.model, "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id,
                           "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id})
    device = info.device
    # fp32 master weights; "bfloat16" means bf16 autocast for the matmuls (CUDA), never bf16 weight updates.
    model = rm.build(args, seed=cfg.seed).to(device=device).train()
    if info.is_distributed:  # before the optimizer sees the parameters
        shard_model(model, info)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16" and device.type == "cuda")
    log(f"model: {model.num_parameters():,} params ({model.num_parameters(active=True):,} active)")
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    use_mtp = bool(cfg.mtp_weight and model.mtp)

    def loss_fn(batch: torch.Tensor, totals: dict[str, float]):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast:
            hidden = model.forward_hidden(inputs)
            loss = -logprobs_from_hidden(model, hidden, targets).mean()
            total = loss
            if use_mtp:
                mtp_sum, mtp_count = mtp_loss_sums(model, hidden, inputs)
                total = total + cfg.mtp_weight * mtp_sum / mtp_count
        # every term is a mean over equally long rows: weight this rank's means by its share of the rows
        return total * (len(batch) / totals["rows"]), {"loss": loss.detach()}

    for step in range(cfg.steps):
        picks = torch.randint(0, len(rows), (cfg.batch_size,), generator=gen)  # the same global batch on every rank
        if info.is_distributed:
            picks = picks[slice(*D.share_bounds(cfg.batch_size, info))]
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step, cfg.steps)
        batches = [rows[picks].to(device)] if len(picks) else []  # fewer rows than ranks: padding passes only
        result = train_step(model, opt, batches, loss_fn, counts=lambda b: {"rows": len(b)}, normalizers=("rows",),
                            info=info, grad_clip=cfg.grad_clip, router_bias_gamma=cfg.router_bias_gamma,
                            dummy_mtp=use_mtp)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            loss_value = float(result.stats[0]["loss"]) if result.stats else 0.0
            if info.is_distributed:  # mean over all rows of the global batch
                loss_value = D.sum_across_ranks(loss_value * len(picks), info) / cfg.batch_size
            if main:
                run_dir.log_metrics(step, {"loss": loss_value, "grad_norm": result.grad_norm, "lr": cfg.lr_at(step, cfg.steps),
                                           "expert_load_max_over_mean": result.expert_balance or 0.0})
            log(f"step {step:5d}  loss {loss_value:.3f}  grad_norm {result.grad_norm:.2f}  lr {cfg.lr_at(step, cfg.steps):.2e}  "
                f"{time.time() - t0:.0f}s")
    model.eval()
    run_dir.close()
    target = save_model_folder(model, tok, info, run_dir.path / "model")  # every rank; rank 0 writes
    return target


def _check_same_rows(rows: torch.Tensor, info: D.DistInfo) -> None:
    """Every rank built its tokenizer and rows itself (seeded): make sure they agree before training."""
    digest = float(int.from_bytes(hashlib.blake2b(rows.numpy().tobytes(), digest_size=6).digest(), "big"))
    if D.max_across_ranks(digest, info) != D.min_across_ranks(digest, info):
        raise RuntimeError("ranks built different training rows (tokenizer or corpus not deterministic)")
