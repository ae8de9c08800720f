"""`r1lab pretrain`: build r1lab's analog of DeepSeek-V3-Base from the procedural corpus.

Steps: generate the bilingual chain-sum corpus → train a byte-level BPE tokenizer on it → pack the
documents into fixed-length rows (document packing without cross-document masking, as V3 pre-training
does) → next-token training with AdamW, warmup + cosine LR, grad clipping, the MoE bias update and the
MTP loss → an HF checkpoint folder with the tokenizer beside it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import r1lab.model as rm
from r1lab.corpus import CorpusConfig, generate_corpus, pretrain_texts
from r1lab.tokenizer import Tokenizer, train_bpe
from r1lab.train.optim import adamw, warmup_cosine_lr
from r1lab.train.run_dir import RunDir


@dataclass
class PretrainConfig:
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
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (V3: 0.1)."""
    grad_clip: float = 1.0
    """Max global grad norm."""
    mtp_weight: float = 0.3
    """λ of the MTP loss (V3: 0.3 early in training)."""
    router_bias_gamma: float = 1e-3
    """Aux-loss-free bias update speed γ."""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    """float32, or bfloat16 (autocast matmuls over fp32 master weights; CUDA only)."""
    log_every: int = 50


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


def lr_at(step: int, cfg: PretrainConfig) -> float:
    return warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


def pretrain(cfg: PretrainConfig, run_dir: RunDir, log=print) -> Path:
    """Train the base model; write it (with its tokenizer) to run_dir/model and metrics to metrics.jsonl."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tok = build_tokenizer(cfg)
    docs = generate_corpus(cfg.corpus, n_docs=cfg.n_docs, seed=cfg.seed)
    rows = pack_rows(docs, tok, cfg.seq_len, cfg.seed)
    log(f"corpus: {len(docs)} docs, {rows.numel():,} tokens in {len(rows)} rows; vocab {tok.vocab_size} ({time.time() - t0:.0f}s)")

    args = rm.ModelArgs(**{**cfg.model, "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id,
                           "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id})
    device = torch.device(cfg.device)
    # fp32 master weights; "bfloat16" means bf16 autocast for the matmuls (CUDA), never bf16 weight updates.
    model = rm.build(args, seed=cfg.seed).to(device=device).train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16" and device.type == "cuda")
    log(f"model: {model.num_parameters():,} params ({model.num_parameters(active=True):,} active)")
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        batch = rows[torch.randint(0, len(rows), (cfg.batch_size,), generator=gen)].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast:
            hidden = model.forward_hidden(inputs)
            logits = model.logits(hidden).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            total = loss
            if cfg.mtp_weight and model.mtp:
                total = total + cfg.mtp_weight * model.mtp_loss(hidden, inputs)
        aux = model.aux_loss()
        if aux is not None:
            total = total + aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        model.update_router_bias(cfg.router_bias_gamma)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            run_dir.log_metrics(step, {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr_at(step, cfg),
                                       "expert_load_max_over_mean": model.expert_load_balance() or 0.0})
            log(f"step {step:5d}  loss {loss.item():.3f}  grad_norm {grad_norm.item():.2f}  lr {lr_at(step, cfg):.2e}  {time.time() - t0:.0f}s")
    model.eval()
    target = run_dir.path / "model"
    rm.save(model, target)
    tok.save(target)
    return target
