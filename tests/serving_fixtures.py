"""A run folder with servable agents on the tiny model (or SmolLM2): a stock per-persona variant and a frozen-trunk
variant with a rating head that reads the stated numbers (stand-in weights, no training: serving
parity does not need a good agent, only the same one on both sides)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_persona_run, write_adapter, write_train_marker

TRUNK = "trunk-single_max-ms"
STOCK = "persona"


def write_head(path: Path, dim: int, rating_ids, prior: str = "stated", seed: int = 0) -> Path:
    """A rating_head.pt as the frozen-trunk recipe saves it, with random weights and prior terms."""
    from persona_tune.evaluation.head import RatingHead

    torch.manual_seed(seed)
    head = RatingHead(dim, rating_ids, prior)
    with torch.no_grad():
        head.weight.normal_(0, 1.6 / dim ** 0.5)  # logits of order one, whatever the width
        head.bias.normal_(0, 0.5)
        head.prior_weight.normal_(0, 0.5)
        head.prior_fill.copy_(torch.tensor([3.6, 3.5])[:head.n_prior])
    torch.save({**head.state_dict(), "rating_ids": head.rating_ids}, path)  # as the recipe saves it
    return path


def build_serving_run(root: Path, family: str = "tiny", scale: float = 0.3) -> tuple[Path, Path | None]:
    """(run folder, tiny model folder or None): K=2 personas, stock adapters persona_{0,1} and the trunk
    variant on ``family`` (tiny, or smollm2 from the converted cache); stand-in LoRA weights ~ N(0, scale)."""
    from torchtune import config as tt_config

    from persona_tune.cli import main as cli_main
    from persona_tune.evaluation.engine import answer_tokens
    from persona_tune.evaluation.grid import write_trunk_configs
    from persona_tune.models.tiny import write_tiny_phi3

    root = Path(root)
    run = make_persona_run(root, n_users=6, seed=0, k=2)
    folder = RunFolder(run)
    tiny, sets = None, []
    if family == "tiny":
        tiny = write_tiny_phi3(root / "tiny", seed=0)
        sets = [f"model_dir={tiny / 'model'}"]
    assert cli_main(["configs", "--run", str(run), "--family", family, "--", *sets]) == 0
    write_trunk_configs(folder, family, ["single_max-ms"], None, sets)
    model_cfg = OmegaConf.load(folder.config_file("persona_0")).model
    for k in (0, 1):
        write_adapter(folder.adapter_dir(f"persona_{k}") / "epoch_1", seed=k, scale=scale, model_cfg=model_cfg)
    trunk = OmegaConf.load(folder.config_file(TRUNK))
    epoch = folder.adapter_dir(TRUNK) / "epoch_1"
    adapter = write_adapter(epoch, seed=5, scale=scale, model_cfg=trunk.model)
    state = torch.load(adapter, weights_only=True)  # the cached lower layers' LoRA never trains: B = 0
    split = len({k.split(".")[1] for k in state}) - int(trunk.adapted_layers)
    state.update({k: torch.zeros_like(v) for k, v in state.items() if int(k.split(".")[1]) < split and "lora_b" in k})
    torch.save(state, adapter)
    rating_ids = answer_tokens(tt_config.instantiate(trunk.tokenizer)).rating_ids
    dim = next(v.shape[1] for k, v in state.items() if k.endswith("lora_a.weight") and "q_proj" in k)
    write_head(epoch / "rating_head.pt", dim, rating_ids)
    write_train_marker(adapter)  # the marker records the files as they end up (the head included)
    return run, tiny


def export_all(run: Path, gguf_type: str = "f32") -> None:
    from persona_tune.cli import main

    for variant in (TRUNK, STOCK):
        assert main(["serve-export", "--run", str(run), "--variant", variant, "--gguf-type", gguf_type]) == 0


def require_llama_cpp() -> None:
    """Skip without llama-cpp-python[server]; fail under CI=true, where it must be installed."""
    import importlib.util
    import os

    import pytest

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        reason = "llama-cpp-python[server] is not installed (make install-llamacpp)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
