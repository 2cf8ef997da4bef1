"""Load an eval config's base model once, then swap persona adapters in and out of it.

The config holds the same ``model`` (a LoRA builder with the training rank/alpha), ``tokenizer`` and
``checkpointer`` sections as the training configs. Adapters are torchtune's own
``adapter_model.pt`` from ``<adapter_dir>/epoch_N/`` (with the frozen-trunk recipe's ``rating_head.pt``
beside it when there is one); ``adapter_dir`` may hold ``{persona}``, which
becomes each persona's id (theta_persona: one adapter per persona), and null means no adapter
(the prompted base model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training
from torchtune.modules.peft import LoRALinear, get_adapter_params

from persona_tune.errors import ConfigError
from persona_tune.runfolder import check_adapter, load_torch


class ModelLoader:
    """The base model built from ``cfg.model``, its base weights kept to restore between adapters."""

    def __init__(self, cfg: DictConfig, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        checkpointer = config.instantiate(cfg.checkpointer)
        self.base_state = checkpointer.load_checkpoint()[training.MODEL_KEY]
        with training.set_default_dtype(dtype), device:
            self.model = config.instantiate(cfg.model)
        self.adapter_keys = set(get_adapter_params(self.model))
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.current: str | None = "unset"

    def load(self, adapter_path: Path | None, merge: bool = True) -> torch.nn.Module:
        """Put the base weights back, then ``adapter_path`` (or none) on top; return the model in eval mode."""
        key = f"{adapter_path}|{merge}"
        if key == self.current:
            return self.model
        from persona_tune.evaluation.head import HeadedOutput, load_rating_head, swap_output
        from persona_tune.runfolder import HEAD_FILE

        if isinstance(self.model.output, HeadedOutput):  # the previous adapter's rating head
            swap_output(self.model, self.model.output.inner)
        missing, unexpected = self.model.load_state_dict(self.base_state, strict=False)
        if unexpected or set(missing) - self.adapter_keys:
            raise ConfigError(
                f"the checkpoint does not fit cfg.model: missing {sorted(set(missing) - self.adapter_keys)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        lora_modules = [m for m in self.model.modules() if isinstance(m, LoRALinear)]
        if adapter_path is None:
            for m in lora_modules:
                m.disabled = True
        else:
            if not lora_modules:
                raise ConfigError("cfg.model has no LoRA modules; use the LoRA builder the adapter was trained with")
            state = load_torch(adapter_path, hint="; retrain the adapter (`persona-tune train --force`)")
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            absent = self.adapter_keys - set(state)
            if unexpected or absent:
                raise ConfigError(
                    f"{adapter_path} does not fit cfg.model's LoRA (rank, alpha, modules must match training): "
                    f"unexpected {sorted(unexpected)[:5]}, absent {sorted(absent)[:5]}"
                )
            for m in lora_modules:
                m.disabled = False
            if merge:
                merge_lora_in_place(self.model)
            head_file = Path(adapter_path).with_name(HEAD_FILE)
            if head_file.is_file():  # a frozen-trunk adapter's rating head (persona_tune.evaluation.head)
                head = load_rating_head(head_file, self.model.norm.scale.shape[0]).to(self.device, self.dtype)
                swap_output(self.model, HeadedOutput(self.model.output, head))
        self.model.to(self.device).eval()
        self.current = key
        return self.model


def adapter_path(adapter_dir: str | None, persona: int, epoch: int | None = None) -> Path | None:
    """``<adapter_dir with {persona} filled>/epoch_N/adapter_model.pt``; N = the last epoch unless given.
    Only a finished, unchanged training's adapter (runfolder.check_adapter; StageMissingError/DataError)."""
    if adapter_dir in (None, "", "null", "none"):
        return None
    root = Path(str(adapter_dir).replace("{persona}", str(persona))).expanduser()
    return check_adapter(root, epoch)


def merge_lora_in_place(model: torch.nn.Module) -> int:
    """Fold every LoRA into its base weight (W += alpha/r * B A) and switch the LoRA path off.

    Returns the number of merged modules. Raises ConfigError for DoRA or a quantised base.
    """
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            if getattr(module, "_quantize_base", False):
                raise ConfigError(f"{name}: cannot merge a LoRA into a quantised base; set merge_adapter: False")
            with torch.no_grad():
                delta = module.lora_b.weight @ module.lora_a.weight
                module.weight.add_((module.alpha / module.rank) * delta.to(module.weight.dtype))
            module.disabled = True
            n += 1
        elif type(module).__name__ == "DoRALinear":
            raise ConfigError(f"{name}: DoRA adapters are evaluated unmerged; set merge_adapter: False")
    return n
