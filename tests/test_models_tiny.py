"""The tiny Phi-3 kit: torchtune and HF transformers load it, logits agree, the tokenizer round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from torchtune.data import Message
from torchtune.models.phi3 import phi3_mini_tokenizer
from torchtune.training import FullModelHFCheckpointer, MODEL_KEY

from persona_tune.cli import main as cli_main
from persona_tune.models.tiny import TINY_PHI3, tiny_phi3, tiny_phi3_tokenizer, write_tiny_phi3

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHAT = [
    Message(role="system", content="I like dark comedies and old westerns. My activity is high.", masked=True),
    Message(role="user", content="Movie: Fargo (1996). Genres: Crime|Drama|Thriller. Rate it from 1 to 5.", masked=True),
    Message(role="assistant", content="4"),
]


def load_tune(tiny, tmp_path):
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(tiny / "model"),
        checkpoint_files=["model.safetensors"],
        model_type="PHI3_MINI",
        output_dir=str(tmp_path / "out"),
    )
    model = tiny_phi3()
    model.load_state_dict(ckpt.load_checkpoint()[MODEL_KEY], strict=True)
    return model.eval()


def test_layout_and_vocab(tiny):
    assert sorted(p.name for p in (tiny / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in (tiny / "tokenizer").iterdir()) == ["special_tokens.json", "tokenizer.model"]
    config = json.loads((tiny / "model" / "config.json").read_text())
    tok = tiny_phi3_tokenizer(str(tiny / "tokenizer" / "tokenizer.model"))
    assert tok.vocab_size == config["vocab_size"] == TINY_PHI3["vocab_size"]
    assert config["eos_token_id"] == tok.eos_id == tok.special_tokens["<|endoftext|>"]


def test_torchtune_checkpointer_loads_strictly_and_matches_transformers(tiny, tmp_path):
    from transformers import Phi3ForCausalLM

    model = load_tune(tiny, tmp_path)
    tokens = torch.tensor([[1, 9, 958, 996, 488, 779, 10, 13, 958, 996, 4]])
    with torch.no_grad():
        tune_logits = model(tokens)
        hf = Phi3ForCausalLM.from_pretrained(str(tiny / "model")).eval()
        hf_logits = hf(tokens).logits
    assert tune_logits.shape == (1, tokens.shape[1], TINY_PHI3["vocab_size"])
    assert torch.isfinite(tune_logits).all()
    assert tune_logits.std() > 0.1  # not a degenerate (constant) model
    torch.testing.assert_close(tune_logits, hf_logits, atol=1e-5, rtol=1e-5)


def test_phi3_mini_tokenizer_round_trips_a_chat(tiny):
    path = str(tiny / "tokenizer" / "tokenizer.model")
    special_path = str(tiny / "tokenizer" / "special_tokens.json")
    stock = phi3_mini_tokenizer(path, special_tokens_path=special_path, max_seq_len=512)
    tokens, mask = stock.tokenize_messages(CHAT, add_eos=True)
    sp = stock._spm_model.spm_model
    assert 0 not in tokens  # no <unk>: byte fallback covers everything
    assert tokens[0] == stock.bos_id and tokens[-1] == stock.eos_id
    for role in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert stock.special_tokens[role] in tokens
    # system and user are masked, the assistant turn is not
    assistant_at = tokens.index(stock.special_tokens["<|assistant|>"])
    assert all(mask[:assistant_at]) and not any(mask[assistant_at:])
    assert sp.id_to_piece(tokens[assistant_at + 3]) == "4"

    # Stock decode keeps the (low-id) special tokens as text; the tiny tokenizer skips them.
    text = CHAT[1].text_content
    assert stock.decode(stock.encode(text, add_bos=True, add_eos=False)) == text
    tok = tiny_phi3_tokenizer(path)
    decoded = tok.decode(tokens)
    assert "<|" not in decoded
    for message in CHAT:
        assert message.text_content in decoded
    assert tok.decode(tok.encode("Amélie (2001) ☃ 12345\n", add_bos=False, add_eos=False)) == "Amélie (2001) ☃ 12345\n"


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = write_tiny_phi3(tmp_path / "again", seed=0)
    for rel in ("model/config.json", "model/model.safetensors", "tokenizer/tokenizer.model", "tokenizer/special_tokens.json"):
        assert (again / rel).read_bytes() == (tiny / rel).read_bytes(), rel
    other = write_tiny_phi3(tmp_path / "other", seed=1)
    assert (other / "model/model.safetensors").read_bytes() != (tiny / "model/model.safetensors").read_bytes()
    assert (other / "tokenizer/tokenizer.model").read_bytes() == (tiny / "tokenizer/tokenizer.model").read_bytes()


def test_cli_writes_the_kit(tmp_path, capsys):
    assert cli_main(["tiny-model", str(tmp_path / "kit"), "--seed", "3"]) == 0
    assert (tmp_path / "kit" / "model" / "model.safetensors").is_file()
    assert "checkpoint_dir:" in capsys.readouterr().out
