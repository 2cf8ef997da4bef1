"""Write a tiny Phi-3-architecture model and tokenizer: a real checkpoint in seconds, for tests and CI.

OUT/model/ holds an HF-layout Phi-3 checkpoint (config.json, model.safetensors with fused qkv_proj
and gate_up_proj) that torchtune's FullModelHFCheckpointer(model_type=PHI3_MINI) and HF
transformers' Phi3ForCausalLM both load. OUT/tokenizer/ holds a SentencePiece model trained on a
built-in English corpus, with Phi-3's special tokens, plus special_tokens.json for
``phi3_mini_tokenizer(path, special_tokens_path=...)``. The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import List, Optional

import torch

from torchtune.models.phi3 import Phi3MiniTokenizer
from torchtune.models.phi3._component_builders import lora_phi3, phi3
from torchtune.models.phi3._convert_weights import phi3_tune_to_hf
from torchtune.models.phi3._tokenizer import PHI3_SPECIAL_TOKENS
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import LORA_ATTN_MODULES
from torchtune.modules.transforms.tokenizers import parse_hf_tokenizer_json

from persona_tune.runfolder import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

# Phi-3 mini's architecture, shrunk. VOCAB_SIZE is the tokenizer's size (SentencePiece pieces,
# byte-fallback pieces and Phi-3's special tokens); the model's embedding has exactly that many rows.
TINY_PHI3 = dict(
    vocab_size=1024,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    embed_dim=64,
    intermediate_dim=128,
    max_seq_len=4096,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=10_000,
)

# Phi-3's special tokens in Phi-3's order; they become ids 3.. right after <unk>, <s>, </s>.
SPECIAL_TOKENS = sorted(PHI3_SPECIAL_TOKENS, key=PHI3_SPECIAL_TOKENS.get)


def tiny_phi3() -> TransformerDecoder:
    """The tiny Phi-3 base model (2 layers, dim 64, 4 heads, vocab 1024)."""
    return phi3(**TINY_PHI3)


def lora_tiny_phi3(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """The tiny Phi-3 with LoRA, like torchtune's ``lora_phi3_mini``."""
    return lora_phi3(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **TINY_PHI3,
    )


class TinyPhi3Tokenizer(Phi3MiniTokenizer):
    """Phi3MiniTokenizer whose ``decode`` skips this vocabulary's special ids.

    torchtune's Phi3MiniTokenizer.decode skips the hard-coded ids 32000-32064 (Phi-3 mini's); in the
    tiny vocabulary the special tokens sit at low ids, so skip the ids of ``special_tokens`` instead.
    """

    def decode(self, ids: List[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            special = set(self.special_tokens.values())
            ids = [i for i in ids if i not in special]
        return self._spm_model.decode(ids)


def tiny_phi3_tokenizer(
    path: str, special_tokens_path: Optional[str] = None, max_seq_len: Optional[int] = None
) -> TinyPhi3Tokenizer:
    """Tokenizer for the tiny Phi-3. ``special_tokens_path`` defaults to special_tokens.json beside ``path``."""
    if special_tokens_path is None:
        special_tokens_path = str(Path(path).with_name("special_tokens.json"))
    return TinyPhi3Tokenizer(
        path=path, special_tokens=parse_hf_tokenizer_json(special_tokens_path), max_seq_len=max_seq_len
    )


# ---------------------------------------------------------------- tokenizer corpus

_GENRES = [
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
]
_TITLES = [
    "Toy Story (1995)", "Jumanji (1995)", "Heat (1995)", "Casino (1995)", "Sabrina (1995)",
    "Braveheart (1995)", "Star Wars: Episode IV - A New Hope (1977)", "Fargo (1996)",
    "Pulp Fiction (1994)", "The Godfather (1972)", "Schindler's List (1993)", "Alien (1979)",
    "Titanic (1997)", "The Matrix (1999)", "American Beauty (1999)", "Back to the Future (1985)",
    "Jurassic Park (1993)", "Men in Black (1997)", "Groundhog Day (1993)", "Casablanca (1942)",
]
_TRAITS = ["activity", "conformity", "diversity"]
_LEVELS = ["low", "medium", "high"]
_ADJECTIVES = [
    "funny", "dark", "slow", "exciting", "boring", "beautiful", "violent", "clever", "predictable",
    "moving", "charming", "scary", "romantic", "classic", "original", "long", "short", "great",
    "good", "bad", "average", "excellent", "terrible", "enjoyable", "memorable", "weak", "strong",
]
_NOUNS = [
    "story", "plot", "acting", "actors", "cast", "director", "ending", "music", "characters",
    "dialogue", "effects", "script", "scenes", "pace", "humor", "visuals", "performances",
]
_SENTENCES = [
    "You are a movie watcher. Here is your profile and your traits.",
    "I am a user who watches movies and rates them on a scale from 1 to 5.",
    "Given your past ratings, predict the rating you would give to the following movie.",
    "Answer with a single number between 1 and 5 and nothing else.",
    "Rating: {r}",
    "I rated {t} as {r} because the {n} was {a}.",
    "I gave {t} a {r} out of 5 since I found the {n} {a} and the {n2} {a2}.",
    "Movie: {t}. Genres: {g}|{g2}. Year: {y}. Average rating: {r}.{d}.",
    "Title: {t}\nGenres: {g}, {g2}\nSummary: A {a} {g} film about {n}.\nCast: the {n2}.",
    "My {tr} is {l}. I mostly watch {g} and {g2} movies, and I like {a} {n}.",
    "Here are movies I watched before: {t} rated {r}; {t2} rated {r2}.",
    "The user prefers {g} over {g2}. Their ratings are usually {l}.",
    "Predict how the user would rate this item. The movie was released in {y} and has {c} ratings.",
    "What rating, from 1 (worst) to 5 (best), would you give this movie?",
]


def _corpus() -> List[str]:
    """A deterministic English corpus covering the prompt vocabulary, digits and movie words."""
    lines = []
    for i in range(3000):
        pick = lambda xs, k=1: xs[(i * 7 + k * 13 + (i // len(xs)) * k) % len(xs)]  # noqa: E731
        template = _SENTENCES[i % len(_SENTENCES)]
        lines.append(
            template.format(
                t=pick(_TITLES), t2=pick(_TITLES, 3), g=pick(_GENRES), g2=pick(_GENRES, 5),
                a=pick(_ADJECTIVES), a2=pick(_ADJECTIVES, 2), n=pick(_NOUNS), n2=pick(_NOUNS, 4),
                tr=pick(_TRAITS), l=pick(_LEVELS), r=1 + i % 5, r2=1 + (i // 5) % 5, d=i % 10,
                y=1919 + i % 82, c=i % 3000,
            )
        )
    return lines


def train_tiny_tokenizer() -> bytes:
    """Train the SentencePiece model (Llama-style BPE with byte fallback); deterministic bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=TINY_PHI3["vocab_size"],
        user_defined_symbols=SPECIAL_TOKENS,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def _special_tokens_json(spm_bytes: bytes) -> dict:
    """Phi-3's special tokens with this vocabulary's ids, shaped like HF tokenizer.json's added_tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    added = []
    for token in SPECIAL_TOKENS:
        token_id = sp.piece_to_id(token)
        if sp.id_to_piece(token_id) != token:
            raise RuntimeError(f"special token {token} is missing from the trained tokenizer")
        added.append(
            {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        )
    return {"added_tokens": added}


def _hf_config(special: dict) -> dict:
    ids = {t["content"]: t["id"] for t in special["added_tokens"]}
    c = TINY_PHI3
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": c["vocab_size"],
        "hidden_size": c["embed_dim"],
        "intermediate_size": c["intermediate_dim"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": c["num_heads"],
        "num_key_value_heads": c["num_kv_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": c["max_seq_len"],
        "original_max_position_embeddings": c["max_seq_len"],
        "rms_norm_eps": c["norm_eps"],
        "rope_theta": float(c["rope_base"]),
        "rope_scaling": None,
        "partial_rotary_factor": 1.0,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "torch_dtype": "float32",
    }


def write_tiny_phi3(out_dir: str | Path, seed: int = 0) -> Path:
    """Write OUT/model/ (HF Phi-3 checkpoint) and OUT/tokenizer/ (SentencePiece + special tokens).

    Returns ``out_dir``. Weights come from torchtune's initialisation under ``torch.manual_seed(seed)``;
    the same seed writes the same bytes.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    spm_bytes = train_tiny_tokenizer()
    special = _special_tokens_json(spm_bytes)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_phi3()
    hf_state = {k: v.contiguous() for k, v in phi3_tune_to_hf(model.state_dict()).items()}

    atomic_write_bytes(out / "tokenizer" / "tokenizer.model", spm_bytes)
    atomic_write_json(out / "tokenizer" / "special_tokens.json", special)
    atomic_write_json(out / "model" / "config.json", _hf_config(special))
    atomic_write_bytes(out / "model" / "model.safetensors", save(hf_state, metadata={"format": "pt"}))
    log.info("wrote tiny Phi-3 (%d params) to %s", sum(v.numel() for v in hf_state.values()), out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="folder to write model/ and tokenizer/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def main(args: argparse.Namespace) -> int:
    out = write_tiny_phi3(args.out_dir, seed=args.seed)
    print(f"checkpoint_dir: {out / 'model'}")
    print(f"tokenizer: {out / 'tokenizer' / 'tokenizer.model'}")
    print(f"special_tokens: {out / 'tokenizer' / 'special_tokens.json'}")
    return 0
