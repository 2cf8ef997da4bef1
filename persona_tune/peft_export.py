"""Convert a torchtune LoRA adapter to HF PEFT format (for PEFT and vLLM), or merge it into the base.

torchtune keeps q/k/v and gate/up as separate projections; HF Phi-3 fuses them into ``qkv_proj`` and
``gate_up_proj``. The LoRAs on the parts become one LoRA on the fused module: A stacks the parts'
A matrices, B is block-diagonal over the parts' output rows (zeros for parts without a LoRA). Every
module is zero-padded to one rank R (twice the trained rank for q+k), and lora_alpha is scaled by
R / r so alpha / r, the LoRA scaling, is unchanged: one plain LoraConfig that PEFT and vLLM load
as is. Llama-family models (SmolLM2) need no fusing: torchtune's own key mapping is used.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from persona_tune.errors import ConfigError, DataError
from persona_tune.runfolder import ADAPTER_FILE, atomic_write_bytes, atomic_write_json, last_epoch_adapter, load_torch

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_FILES = (ADAPTER_FILE, "adapter_model.safetensors")

# torchtune module (under layers.N) -> (HF Phi-3 module, index of the part inside a fused module or None)
PHI3_MODULES = {
    "attn.q_proj": ("self_attn.qkv_proj", 0),
    "attn.k_proj": ("self_attn.qkv_proj", 1),
    "attn.v_proj": ("self_attn.qkv_proj", 2),
    "attn.output_proj": ("self_attn.o_proj", None),
    "mlp.w1": ("mlp.gate_up_proj", 0),
    "mlp.w3": ("mlp.gate_up_proj", 1),
    "mlp.w2": ("mlp.down_proj", None),
}

_TUNE_KEY = re.compile(r"^(?:layers\.(\d+)\.)?([\w.]+?)\.(lora_a\.weight|lora_b\.weight|magnitude)$")


# ---------------------------------------------------------------- inputs


def find_adapter(path: str | Path) -> Path:
    """An adapter file; or a folder holding one; or a torchtune output dir (its last epoch_N)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in ADAPTER_FILES:
            if (path / name).is_file():
                return path / name
        last = last_epoch_adapter(path, ADAPTER_FILES, missing_ok=True)
        if last is not None:
            return last
    raise ConfigError(f"no torchtune adapter at {path} (expected {' or '.join(ADAPTER_FILES)} or epoch_N/)")


def load_adapter(path: str | Path) -> Dict[str, torch.Tensor]:
    path = find_adapter(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_torch(path)
    except DataError:
        raise
    except Exception as e:  # corrupt or foreign file
        raise DataError(f"cannot read adapter weights: {e}", path) from e
    if not isinstance(state, dict) or not state:
        raise DataError("not a non-empty state dict of adapter weights", path)
    return state


def read_base_config(base_model_dir: str | Path) -> dict:
    path = Path(base_model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: --base must be an HF checkpoint folder")
    return json.loads(path.read_text())


def detect_family(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type in ("phi3", "llama"):
        return model_type
    raise ConfigError(f"unsupported base model_type {model_type!r}: PEFT export knows phi3 and llama")


def load_base_weights(base_model_dir: str | Path) -> Dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors checkpoint (one file or shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(base_model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors in {base_model_dir}")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _parse_tune_adapter(state: Dict[str, torch.Tensor], path) -> Dict[Tuple[Optional[int], str], dict]:
    """Group torchtune adapter tensors by (layer, module): {"lora_a": A, "lora_b": B, "magnitude": m}."""
    modules: Dict[Tuple[Optional[int], str], dict] = defaultdict(dict)
    for key, value in state.items():
        match = _TUNE_KEY.match(key)
        if not match:
            raise DataError(f"unexpected key {key!r} in a torchtune LoRA adapter", path)
        layer, module, kind = match.groups()
        modules[(int(layer) if layer is not None else None, module)][kind.split(".")[0]] = value
    for (layer, module), parts in modules.items():
        if "lora_a" not in parts or "lora_b" not in parts:
            raise DataError(f"adapter of {module} (layer {layer}) lacks lora_a or lora_b", path)
    return modules


# ---------------------------------------------------------------- conversion


def _phi3_to_peft(
    modules: Dict[Tuple[Optional[int], str], dict], config: dict, base_model_dir, path
) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], List[str]]:
    """(HF module path -> (A, B, magnitude)) with q/k/v and gate/up LoRAs fused, and target module names."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    part_rows = {
        "self_attn.qkv_proj": [config["num_attention_heads"] * head_dim, kv_heads * head_dim, kv_heads * head_dim],
        "mlp.gate_up_proj": [config["intermediate_size"]] * 2,
    }
    fused: Dict[Tuple[int, str], dict] = defaultdict(dict)
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = {}
    for (layer, module), t in modules.items():
        if layer is None and module == "output":
            out["lm_head"] = (t["lora_a"], t["lora_b"], t.get("magnitude"))
            continue
        if layer is None or module not in PHI3_MODULES:
            raise DataError(f"no HF Phi-3 module for torchtune module {module!r}", path)
        hf_module, index = PHI3_MODULES[module]
        name = f"model.layers.{layer}.{hf_module}"
        if index is None:
            out[name] = (t["lora_a"], t["lora_b"], t.get("magnitude"))
        else:
            fused[(layer, hf_module)][index] = t

    base = None
    for (layer, hf_module), parts in sorted(fused.items()):
        rows = part_rows[hf_module]
        name = f"model.layers.{layer}.{hf_module}"
        present = sorted(parts)
        rank = parts[present[0]]["lora_a"].shape[0]
        a = torch.cat([parts[i]["lora_a"] for i in present], dim=0)
        b = torch.zeros(sum(rows), rank * len(present), dtype=parts[present[0]]["lora_b"].dtype)
        row_start = [sum(rows[:i]) for i in range(len(rows))]
        for block, i in enumerate(present):
            part_b = parts[i]["lora_b"]
            if part_b.shape != (rows[i], rank):
                raise DataError(f"{name} part {i}: lora_b shape {tuple(part_b.shape)} != {(rows[i], rank)}", path)
            b[row_start[i] : row_start[i] + rows[i], block * rank : (block + 1) * rank] = part_b
        magnitude = None
        if any("magnitude" in parts[i] for i in present):
            # DoRA: rows without a LoRA keep their base weight, i.e. magnitude = the base row norm.
            if base is None:
                base = load_base_weights(base_model_dir)
            magnitude = base[f"{name}.weight"].float().norm(dim=1).to(parts[present[0]]["magnitude"].dtype)
            for i in present:
                magnitude[row_start[i] : row_start[i] + rows[i]] = parts[i]["magnitude"]
        out[name] = (a, b, magnitude)
    targets = sorted({n.rsplit(".", 1)[-1] for n in out})
    return out, targets


def _llama_to_peft(
    modules: Dict[Tuple[Optional[int], str], dict], state: Dict[str, torch.Tensor], config: dict
) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], List[str]]:
    """torchtune's own Llama mapping (it un-permutes the q/k rows of lora_B for HF's RoPE layout)."""
    from torchtune.models.convert_weights import _TO_PEFT_TARGET_MODULES, tune_to_peft_adapter_weights

    peft = tune_to_peft_adapter_weights(
        state,
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        dim=config["hidden_size"],
        head_dim=config.get("head_dim"),
    )
    out = {}
    for key in peft:
        if key.endswith(".lora_A.weight"):
            name = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            out[name] = (
                peft[key],
                peft[f"{PEFT_PREFIX}{name}.lora_B.weight"],
                peft.get(f"{PEFT_PREFIX}{name}.lora_magnitude_vector"),
            )
    targets = sorted({_TO_PEFT_TARGET_MODULES[module.rsplit(".", 1)[-1]] for _, module in modules})
    return out, targets


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return (
        torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
        torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
    )


def convert_adapter(
    adapter_path: str | Path,
    base_model_dir: str | Path,
    model_family: Optional[str] = None,
    lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    target_modules: Optional[Sequence[str]] = None,
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The pure core: (PEFT state dict, adapter_config dict) for a torchtune adapter."""
    path = find_adapter(adapter_path)
    config = read_base_config(base_model_dir)
    family = model_family or detect_family(config)
    if family not in ("phi3", "llama"):
        raise ConfigError(f"model_family must be 'phi3' or 'llama', not {family!r}")
    state = load_adapter(path)
    if any(k.startswith(PEFT_PREFIX) for k in state):
        raise DataError("already in PEFT format (export the adapter_model.pt beside it instead)", path)
    modules = _parse_tune_adapter(state, path)

    ranks = {t["lora_a"].shape[0] for t in modules.values()}
    if len(ranks) != 1:
        raise DataError(f"modules have different LoRA ranks {sorted(ranks)}", path)
    rank = ranks.pop()
    if lora_rank is not None and lora_rank != rank:
        raise ConfigError(f"lora_rank={lora_rank} but the adapter's rank is {rank} ({path})")
    if lora_alpha is None:
        lora_alpha = _alpha_beside(path)
    if target_modules is not None:
        trained = {module.rsplit(".", 1)[-1] for _, module in modules}
        expected = set(target_modules)
        if trained != expected:
            raise ConfigError(f"target_modules {sorted(expected)} but the adapter trained {sorted(trained)} ({path})")

    if family == "phi3":
        peft_modules, targets = _phi3_to_peft(modules, config, base_model_dir, path)
    else:
        peft_modules, targets = _llama_to_peft(modules, state, config)

    peft_rank = max(a.shape[0] for a, _, _ in peft_modules.values())
    use_dora = any(m is not None for _, _, m in peft_modules.values())
    peft_state: Dict[str, torch.Tensor] = {}
    for name, (a, b, magnitude) in sorted(peft_modules.items()):
        a, b = _pad_rank(a, b, peft_rank)
        peft_state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        peft_state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        if magnitude is not None:
            peft_state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = magnitude.contiguous()
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_model_dir).resolve()),
        "r": peft_rank,
        "lora_alpha": float(lora_alpha) * peft_rank / rank,  # keeps alpha / r
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": use_dora,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return peft_state, adapter_config


def _alpha_beside(path: Path) -> float:
    """lora_alpha from the adapter_config.json torchtune writes beside Llama adapters."""
    config_path = path.with_name("adapter_config.json")
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if "lora_alpha" in config:
            return float(config["lora_alpha"])
    raise ConfigError(f"lora_alpha is needed for {path} (torchtune writes no adapter config for Phi-3)")


def export_peft(
    adapter_path: str | Path,
    base_model_dir: str | Path,
    out_dir: str | Path,
    model_family: Optional[str] = None,
    lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    target_modules: Optional[Sequence[str]] = None,
) -> Path:
    """Write OUT/adapter_model.safetensors + OUT/adapter_config.json, loadable by HF PEFT and vLLM."""
    from safetensors.torch import save

    peft_state, adapter_config = convert_adapter(
        adapter_path, base_model_dir, model_family, lora_rank, lora_alpha, target_modules
    )
    out = Path(out_dir)
    atomic_write_bytes(out / "adapter_model.safetensors", save(peft_state, metadata={"format": "pt"}))
    atomic_write_json(out / "adapter_config.json", adapter_config)
    log.info("wrote PEFT adapter (r=%d, %d tensors) to %s", adapter_config["r"], len(peft_state), out)
    return out


def merge_adapter(
    adapter_path: str | Path,
    base_model_dir: str | Path,
    out_dir: str | Path,
    model_family: Optional[str] = None,
    lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    target_modules: Optional[Sequence[str]] = None,
) -> Path:
    """Write OUT/ as a full HF checkpoint (model.safetensors + the base's json files) with the LoRA merged in.

    W' = W + (alpha / r) B A, and for DoRA W' = m * W' / ||W'|| (row norms), as PEFT merges.
    """
    from safetensors.torch import save

    peft_state, adapter_config = convert_adapter(
        adapter_path, base_model_dir, model_family, lora_rank, lora_alpha, target_modules
    )
    scaling = adapter_config["lora_alpha"] / adapter_config["r"]
    weights = load_base_weights(base_model_dir)
    for key in peft_state:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        weight_key = f"{name}.weight"
        if weight_key not in weights:
            raise ConfigError(f"{base_model_dir} has no {weight_key} to merge into (tied embeddings?)")
        w = weights[weight_key]
        merged = w.float() + scaling * (
            peft_state[f"{PEFT_PREFIX}{name}.lora_B.weight"].float() @ peft_state[key].float()
        )
        magnitude = peft_state.get(f"{PEFT_PREFIX}{name}.lora_magnitude_vector")
        if magnitude is not None:
            merged = magnitude.float()[:, None] * merged / merged.norm(dim=1, keepdim=True)
        weights[weight_key] = merged.to(w.dtype).contiguous()

    out = Path(out_dir)
    atomic_write_bytes(out / "model.safetensors", save(weights, metadata={"format": "pt"}))
    for f in sorted(Path(base_model_dir).glob("*.json")):
        if f.name not in ("model.safetensors.index.json", "adapter_config.json"):
            atomic_write_bytes(out / f.name, f.read_bytes())
    log.info("wrote merged checkpoint to %s", out)
    return out
