"""PEFT export: HF PEFT on the exported adapter (and the merged checkpoint) gives torchtune's LoRA logits."""

from __future__ import annotations

import json

import pytest
import torch

from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules.peft import get_adapter_state_dict
from torchtune.training import FullModelHFCheckpointer, MODEL_KEY

from persona_tune.cli import main as cli_main
from persona_tune.errors import ConfigError, DataError
from persona_tune.models.tiny import lora_tiny_phi3
from persona_tune.peft_export import convert_adapter, export_peft, merge_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = torch.tensor([[1, 9, 958, 996, 488, 779, 10, 13, 958, 996, 4, 300, 301, 17]])


def randomise_adapter(model, seed):
    """Non-zero random LoRA (and DoRA magnitude) weights, as training would leave them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            elif name.endswith("magnitude"):
                param.mul_(1 + 0.1 * torch.rand(param.shape, generator=gen))
    return get_adapter_state_dict(model.state_dict())


def tiny_lora_logits(tiny, tmp_path, seed=0, **lora):
    """torchtune's lora_tiny_phi3 on the tiny checkpoint with random adapter weights, saved as adapter_model.pt."""
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(tiny / "model"), checkpoint_files=["model.safetensors"],
        model_type="PHI3_MINI", output_dir=str(tmp_path / "tune_out"),
    )
    model = lora_tiny_phi3(**lora)
    model.load_state_dict(ckpt.load_checkpoint()[MODEL_KEY], strict=False)
    if lora.get("use_dora"):
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
    adapter = randomise_adapter(model, seed)
    adapter_path = tmp_path / "epoch_0" / "adapter_model.pt"
    adapter_path.parent.mkdir(parents=True)
    torch.save(adapter, adapter_path)
    with torch.no_grad():
        return model.eval()(TOKENS), adapter_path


def peft_logits(base_dir, peft_dir, model_cls):
    from peft import PeftModel

    base = model_cls.from_pretrained(str(base_dir)).eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(peft_dir)).eval()(TOKENS).logits


@pytest.mark.parametrize(
    "lora",
    [
        dict(lora_attn_modules=["q_proj", "k_proj"], lora_rank=8, lora_alpha=16),
        dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
             apply_lora_to_output=True, lora_rank=4, lora_alpha=32),
        dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8,
             use_dora=True),
    ],
    ids=["q_k", "all_modules", "dora"],
)
def test_phi3_peft_and_merged_match_torchtune(tiny, tmp_path, lora):
    from transformers import Phi3ForCausalLM

    tune_logits, adapter_path = tiny_lora_logits(tiny, tmp_path, **lora)
    base_logits = Phi3ForCausalLM.from_pretrained(str(tiny / "model")).eval()(TOKENS).logits.detach()
    assert (tune_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the output

    # A torchtune output dir resolves to its last epoch; alpha must be given for Phi-3.
    peft_dir = export_peft(tmp_path, tiny / "model", tmp_path / "peft", lora_alpha=lora["lora_alpha"],
                           lora_rank=lora["lora_rank"])
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == lora["lora_alpha"] / lora["lora_rank"]
    assert "qkv_proj" in config["target_modules"] and config["use_dora"] == bool(lora.get("use_dora"))
    torch.testing.assert_close(peft_logits(tiny / "model", peft_dir, Phi3ForCausalLM), tune_logits, atol=1e-5, rtol=1e-5)

    merged = merge_adapter(adapter_path, tiny / "model", tmp_path / "merged", lora_alpha=lora["lora_alpha"])
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        merged_logits = Phi3ForCausalLM.from_pretrained(str(merged)).eval()(TOKENS).logits
    torch.testing.assert_close(merged_logits, tune_logits, atol=1e-5, rtol=1e-5)


TINY_LLAMA = dict(vocab_size=1024, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=256,
                  intermediate_dim=128, norm_eps=1e-5, rope_base=100_000, scale_factor=1, tie_word_embeddings=True)


def test_llama_peft_and_merged_match_torchtune(tmp_path):
    """A tiny Llama with SmolLM2's layout (GQA, tied embeddings): covers the q/k RoPE permutation."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = llama3_2(**TINY_LLAMA)
    hf_dir = tmp_path / "base"
    LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=100_000.0,
        tie_word_embeddings=True,
    ).save_pretrained(str(hf_dir))
    hf_state = tune_to_hf(base.state_dict(), num_heads=4, num_kv_heads=2, dim=64)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(hf_dir / "model.safetensors"))

    model = lora_llama3_2(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                          lora_rank=8, lora_alpha=16, **TINY_LLAMA)
    model.load_state_dict(base.state_dict(), strict=False)
    adapter = randomise_adapter(model, seed=1)
    torch.save(adapter, tmp_path / "adapter_model.pt")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))  # as torchtune writes
    with torch.no_grad():
        tune_logits = model.eval()(TOKENS)

    peft_dir = export_peft(tmp_path / "adapter_model.pt", hf_dir, tmp_path / "peft")  # alpha read beside it
    assert json.loads((peft_dir / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    torch.testing.assert_close(peft_logits(hf_dir, peft_dir, LlamaForCausalLM), tune_logits, atol=1e-5, rtol=1e-5)
    merged = merge_adapter(tmp_path / "adapter_model.pt", hf_dir, tmp_path / "merged")
    with torch.no_grad():
        merged_logits = LlamaForCausalLM.from_pretrained(str(merged)).eval()(TOKENS).logits
    torch.testing.assert_close(merged_logits, tune_logits, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_clear_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="no torchtune adapter"):
        export_peft(tmp_path / "nothing", tiny / "model", tmp_path / "out", lora_alpha=16)
    _, adapter_path = tiny_lora_logits(tiny, tmp_path, lora_attn_modules=["q_proj", "k_proj"], lora_rank=8, lora_alpha=16)
    with pytest.raises(ConfigError, match="lora_alpha is needed"):
        convert_adapter(adapter_path, tiny / "model")
    with pytest.raises(ConfigError, match="the adapter's rank is 8"):
        convert_adapter(adapter_path, tiny / "model", lora_alpha=16, lora_rank=16)
    with pytest.raises(ConfigError, match="trained"):
        convert_adapter(adapter_path, tiny / "model", lora_alpha=16, target_modules=["q_proj"])
    bad = tmp_path / "bad.pt"
    torch.save({"layers.0.attn.q_proj.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(DataError, match="unexpected key"):
        convert_adapter(bad, tiny / "model", lora_alpha=16)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pt"):
        convert_adapter(tmp_path / "junk.pt", tiny / "model", lora_alpha=16)


def test_cli(tiny, tmp_path, capsys):
    _, adapter_path = tiny_lora_logits(tiny, tmp_path, lora_attn_modules=["q_proj", "k_proj"], lora_rank=8, lora_alpha=16)
    argv = ["export-peft", "--adapter", str(adapter_path.parent), "--base", str(tiny / "model"), "--lora-alpha", "16"]
    assert cli_main([*argv, "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert cli_main([*argv, "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert cli_main(["export-peft", "--adapter", str(adapter_path), "--base", str(tiny / "model"),
                     "--out", str(tmp_path / "x")]) == 2  # no alpha: one-line error
    assert "lora_alpha is needed" in capsys.readouterr().err
