"""Export a trained variant as a serving bundle for vLLM and llama.cpp.

    persona-tune serve-export --run RUN --variant trunk-single_max-ms [--gguf-type f16]

Writes RUN/serving/<variant>/ (docs/serving.md):
- ``<adapter>/adapter_model.safetensors`` + ``adapter_config.json``: a PEFT LoRA per adapter (one per
  persona for per-persona variants) whose targets include ``lm_head``, the rating head folded in
  (persona_tune.serving.export); vLLM serves it with ``--enable-lora --lora-modules <adapter>=DIR``;
- ``<adapter>/adapter.gguf``: the same LoRA for llama.cpp;
- ``serving.json``: the rating tokens, each adapter's served name, head bias, prior weights and fill,
  and the rule a client follows to turn them into per-request terms;
- RUN/serving/base/<model>-<type>.gguf: the base model for llama.cpp (f32, f16 or a quantisation),
  with an explicit output weight; shared by the run's variants and rewritten only when its source changed.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from persona_tune.errors import ConfigError
from persona_tune.names import FAMILIES, TAG_OF
from persona_tune.runfolder import (
    SERVING_SPEC,
    RunFolder,
    atomic_write_bytes,
    atomic_write_json,
    check_name,
    file_sha256,
)
from persona_tune.serving import export as ex
from persona_tune.stage import add_config_arguments, config_dict, config_from_args, require, validate

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "base"  # the served name of the base model without an adapter (the prompted variant)


@dataclass
class ServeExportConfig:
    variant: str = field(default="persona", metadata={
        "help": "the trained variant to export: persona, single_max, trunk-single_max-ms, ... (prompted: the base only)"})
    family: str | None = field(default=None, metadata={
        "choices": FAMILIES, "help": "model family (default: the one `persona-tune configs` recorded)"})
    memory: str = field(default="ms+ml", metadata={
        "choices": tuple(TAG_OF), "help": "memory mode of `prompted` (adapters use their training memory)"})
    gguf: bool = field(default=True, metadata={"help": "write the GGUF pair for llama.cpp"})
    gguf_type: str = field(default="f16", metadata={
        "choices": ex.GGUF_TYPES, "help": "tensor type of the base GGUF (parity holds for f32 and f16)"})
    peft: bool = field(default=True, metadata={"help": "write the PEFT adapters (HF PEFT, vLLM)"})

    def validate(self) -> None:
        check_name(self.variant)
        require(self.gguf or self.peft, "nothing to export: keep --gguf or --peft")


def _personas(run: RunFolder, adapter_dir) -> list[int]:
    if "{persona}" not in str(adapter_dir or ""):
        return [-1]
    return sorted(int(p) for p in run.read_assignments(columns=["persona"])["persona"].unique())


def _tokenizer_kv(eval_cfg, tokenizer, vocab_size: int) -> list[tuple]:
    """The tokenizer metadata of the base GGUF: SentencePiece models are described from their file;
    SmolLM2's is copied from the GGUF it was converted from."""
    if hasattr(tokenizer, "_spm_model"):
        return ex.tokenizer_kv_from_sentencepiece(Path(eval_cfg.tokenizer.path), tokenizer.special_tokens,
                                                  vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    if "smollm2" in str(eval_cfg.tokenizer._component_):
        from persona_tune.models.smollm2 import find_gguf

        return ex.tokenizer_kv_from_gguf(find_gguf())
    raise ConfigError(f"the GGUF export knows SentencePiece and SmolLM2 tokenizers, not "
                      f"{eval_cfg.tokenizer._component_}; export with --no-gguf")


def write_base(run: RunFolder, eval_cfg, tokenizer, model_dir: Path, kind: str) -> Path:
    """RUN/serving/base/<model>-<kind>.gguf, unless it exists from the same source."""
    from torchtune import config as tt_config, training

    files = [Path(eval_cfg.checkpointer.checkpoint_dir) / f for f in eval_cfg.checkpointer.checkpoint_files]
    source = {"model_dir": str(model_dir), "files": {str(f): file_sha256(f) for f in files}, "type": kind,
              "tokenizer": str(eval_cfg.tokenizer.path), "format": ex.SERVING_FORMAT}
    out = run.serving_dir / "base" / f"{model_dir.parent.name or model_dir.name}-{kind}.gguf"
    stamp = out.with_suffix(".json")
    if out.is_file() and stamp.is_file() and ex.read_json(stamp) == source:
        log.info("%s is current, kept", out)
        return out
    config = ex.model_config(model_dir)
    state = tt_config.instantiate(eval_cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
    kv = _tokenizer_kv(eval_cfg, tokenizer, int(state["tok_embeddings.weight"].shape[0]))
    log.info("writing %s", out)
    ex.write_base_gguf(out, state, config, kv, kind, name=f"{model_dir.parent.name} ({kind})")
    atomic_write_json(stamp, source)
    return out


def run(run: RunFolder, cfg: ServeExportConfig) -> dict:
    """The `serve-export` stage: RUN/serving/<variant>/ (see the module docstring)."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    from safetensors.torch import save
    from torchtune import config as tt_config

    from persona_tune.evaluation.engine import answer_tokens
    from persona_tune.evaluation.loading import adapter_path
    from persona_tune.evaluation.run import adapter_variants, build_eval_config, check_adapters, run_family
    from persona_tune.evaluation.head import load_rating_head
    from persona_tune.runfolder import HEAD_FILE

    family = run_family(run, cfg.family)
    eval_cfg = build_eval_config(run, cfg.variant, family, cfg.memory, "scoring")
    adapters = check_adapters(run, [cfg.variant])[cfg.variant] if eval_cfg.adapter_dir else {}
    model_dir = Path(eval_cfg.checkpointer.checkpoint_dir)
    hf_config = ex.model_config(model_dir)
    arch = ex.ARCHS[hf_config["model_type"]]
    tokenizer = tt_config.instantiate(eval_cfg.tokenizer)
    answer = answer_tokens(tokenizer)
    vocab = int(hf_config["vocab_size"])
    texts, shared = ex.rating_texts(tokenizer, answer.rating_ids, vocab)
    out = run.serving_variant_dir(cfg.variant)
    base_gguf = write_base(run, eval_cfg, tokenizer, model_dir, cfg.gguf_type) if cfg.gguf else None

    personas = _personas(run, eval_cfg.adapter_dir)
    names = adapter_variants(run, cfg.variant) or [BASE_MODEL_NAME]
    entries = []
    gguf_layout = ex.lora_layout(hf_config)
    for persona, name in zip(personas, names):
        entry = {"persona": persona, "model": name, "head": None, "peft": None, "gguf": None, "source": None}
        path = adapter_path(eval_cfg.adapter_dir, persona, eval_cfg.get("adapter_epoch"))
        if path is None:  # the prompted base model: nothing to export but the base
            entries.append(entry)
            continue
        entry["source"] = {"adapter": str(path.relative_to(run.root)), "sha256": file_sha256(path)}
        head = None
        head_file = path.with_name(HEAD_FILE)
        if head_file.is_file():
            head = load_rating_head(head_file, int(hf_config["hidden_size"]))
            if tuple(head.rating_ids.tolist()) != tuple(answer.rating_ids):
                raise ConfigError(f"{head_file}: rating tokens {head.rating_ids.tolist()} are not the tokenizer's "
                                  f"{list(answer.rating_ids)}")
            entry["head"] = ex.HeadTerms.from_head(head).to_json()
            entry["source"]["head_sha256"] = file_sha256(head_file)
        folder = out / check_name(name)
        if cfg.peft:
            state, adapter_config = ex.peft_bundle(path, model_dir, head, lora_alpha=float(eval_cfg.model.lora_alpha))
            atomic_write_bytes(folder / "adapter_model.safetensors", save(state, metadata={"format": "pt"}))
            atomic_write_json(folder / "adapter_config.json", adapter_config)
            entry["peft"] = str(folder.relative_to(run.root))
        if cfg.gguf:
            tune_state = torch.load(path, map_location="cpu", weights_only=True)
            head_a = head_b = None
            if head is not None:
                head_a, head_b = ex.fold_head(head.weight, answer.rating_ids, vocab)
            tensors = ex.gguf_lora_tensors(tune_state, arch, float(eval_cfg.model.lora_alpha),
                                           int(eval_cfg.model.lora_rank), *gguf_layout, head_a, head_b)
            ex.write_lora_gguf(folder / "adapter.gguf", tensors, arch, float(eval_cfg.model.lora_alpha), name)
            entry["gguf"] = str((folder / "adapter.gguf").relative_to(run.root))
        entries.append(entry)

    spec = {
        "format_version": ex.SERVING_FORMAT,
        "variant": cfg.variant,
        "family": family,
        "base": {"hf_model_dir": str(model_dir), "model_type": hf_config["model_type"],
                 "tied_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
                 "gguf": None if base_gguf is None else str(base_gguf.relative_to(run.root)),
                 "gguf_type": cfg.gguf_type if base_gguf is not None else None},
        "rating_token_ids": list(answer.rating_ids),
        "rating_texts": texts,
        "rating_texts_shared": shared,
        "prior_features": ex.PRIOR_FEATURES,
        "logit_bias_rule": ex.LOGIT_BIAS_RULE,
        "prompt": {"memory": str(eval_cfg.memory), "template": str(eval_cfg.get("prompt_template", "paper")),
                   "state_numbers": bool(eval_cfg.get("state_numbers", False)),
                   "collab_memories": int(eval_cfg.get("collab_memories", 0) or 0)},
        "adapters": entries,
        "adapter_checksums": adapters,
    }
    atomic_write_json(out / SERVING_SPEC, spec)
    summary = {"variant": cfg.variant, "adapters": len(entries), "heads": sum(e["head"] is not None for e in entries),
               "out_dir": str(out), "base_gguf": spec["base"]["gguf"]}
    run.record_stage(f"serve-export/{cfg.variant}", config_dict(cfg), summary=summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (after `persona-tune train` or `grid`)")
    add_config_arguments(parser, ServeExportConfig)


def main(args: argparse.Namespace) -> int:
    summary = run(RunFolder(args.run), config_from_args(ServeExportConfig, args))
    print(f"serve-export: {summary['adapters']} adapter(s), {summary['heads']} with a rating head folded in; "
          f"wrote {summary['out_dir']}/" + (f" and {summary['base_gguf']}" if summary["base_gguf"] else ""))
    return 0
