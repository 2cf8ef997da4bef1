"""Convert a torchtune LoRA adapter to HF PEFT format (for PEFT and vLLM), or merge it into the base.

The `export-peft` command over persona_tune/peft_export.py, which explains the conversion.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from persona_tune.peft_export import export_peft, merge_adapter
from persona_tune.stage import ranged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, type=Path,
                        help="torchtune adapter_model.pt, a folder holding it, or a torchtune output dir (last epoch)")
    parser.add_argument("--base", required=True, type=Path, help="the base model's HF checkpoint folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--merge", action="store_true", help="write a merged full checkpoint instead of a PEFT adapter")
    parser.add_argument("--model-family", choices=["phi3", "llama"], default=None,
                        help="default: from the base's config.json model_type")
    parser.add_argument("--lora-rank", type=ranged(int, min=1), default=None, help="check the adapter has this rank")
    parser.add_argument("--lora-alpha", type=ranged(float, gt=0), default=None,
                        help="the training lora_alpha (needed for Phi-3; Llama adapters carry it)")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="check the adapter trained exactly these torchtune modules (e.g. q_proj k_proj)")


def main(args: argparse.Namespace) -> int:
    fn = merge_adapter if args.merge else export_peft
    out = fn(args.adapter, args.base, args.out, args.model_family, args.lora_rank, args.lora_alpha,
             args.target_modules)
    print(out)
    return 0
