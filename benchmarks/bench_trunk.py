"""Benchmark the frozen-trunk path (lora_frozen_trunk) against the stock LoRA recipe's training step.

On the same model, the same training rows and the same prompts (a synthetic run, memory M_s, the
compact template with stated numbers), in one process, one torch thread, CPU seconds:
- stock:  LoRA on q/k of every layer (the smollm2_persona configs' placement), full forward over
          padded batches of 4 rows, torchtune's chunked cross-entropy on the answer, backward, AdamW:
          what `lora_finetune_single_device` computes per step;
- trunk:  the lower layers once per row into the cache (a one-off per run), then epochs on the top
          ``--adapted-layers`` layers (LoRA on q/k/v/o, rating head, squared error of the expected
          rating), each user's prompt prefix shared by the rows of a tree.
Reports training tokens/s per epoch (prompt tokens of the rows / seconds), the cost of an extra
variant (another persona, objective...: the cache exists) relative to the stock recipe's, and the
cost of evaluating all the cells of a grid relative to one cell (one trunk pass over the test rows
serves every cell). Both trunk timings are repeated with the last layer run at every position (the
recipe runs its queries and MLP at the answer positions only), to measure what that saves.

    python benchmarks/bench_trunk.py --model smollm2 --rows 64 --test-rows 64
    python benchmarks/bench_trunk.py --model tiny --rows 32 --test-rows 32      # quick (make bench)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import load_model, make_run, timed  # noqa: E402

import persona_tune.trunk as trunk_module  # noqa: E402
from persona_tune.prompts import FitToLength  # noqa: E402
from persona_tune.evaluation.predict import answer_tokens, encode_prompt  # noqa: E402
from persona_tune.prompts import load_prompt_rows  # noqa: E402
from persona_tune.evaluation.head import RatingHead  # noqa: E402
from persona_tune.trunk import (  # noqa: E402
    TrunkCache,
    make_trees,
    rating_loss,
    split_layer,
    top_forward,
    tree_batches,
)


def with_lora(model, targets: list[str], layers: range, rank: int = 16, alpha: float = 32.0) -> list[torch.nn.Parameter]:
    """Wrap ``targets`` of ``layers`` in torchtune LoRALinear (B = 0, so outputs are unchanged); return the
    LoRA parameters. Everything else is frozen."""
    from torchtune.modules.peft import LoRALinear

    model.requires_grad_(False)
    params = []
    for i in layers:
        attn = model.layers[i].attn
        for name in targets:
            base = getattr(attn, name)
            lora = LoRALinear(base.in_features, base.out_features, rank=rank, alpha=alpha, use_bias=base.bias is not None)
            lora.weight.data.copy_(base.weight.data)
            if base.bias is not None:
                lora.bias.data.copy_(base.bias.data)
            lora.weight.requires_grad_(False)
            setattr(attn, name, lora)
            params += [lora.lora_a.weight, lora.lora_b.weight]
    return params


def stock_epoch(model, tokenizer, answer, prompts, ratings, batch_size: int = 4) -> float:
    """One epoch of the stock step: full forward, chunked CE on the answer token, backward, AdamW."""
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    params = with_lora(model, ["q_proj", "k_proj"], range(len(model.layers)))
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    model.train()

    def epoch():
        for start in range(0, len(prompts), batch_size):
            rows = list(range(start, min(start + batch_size, len(prompts))))
            longest = max(len(prompts[r]) + 1 for r in rows)
            tokens = torch.zeros(len(rows), longest, dtype=torch.long)
            labels = torch.full((len(rows), longest), -100, dtype=torch.long)
            for b, r in enumerate(rows):
                seq = list(prompts[r]) + [answer.rating_ids[ratings[r] - 1]]
                tokens[b, : len(seq)] = torch.tensor(seq)
                labels[b, len(seq) - 2] = seq[-1]  # the answer, predicted at the last prompt position
            logits = model(tokens)
            loss = loss_fn(logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    _, seconds = timed(epoch, "stock epoch")
    return seconds


@contextlib.contextmanager
def full_last_layer():
    """top_forward with the last layer over every position, as before the answer-only last layer."""
    fast = trunk_module.last_layer_at_answers
    trunk_module.last_layer_at_answers = trunk_module.full_layer_at_answers
    try:
        yield
    finally:
        trunk_module.last_layer_at_answers = fast


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--rows", type=int, default=32, help="training rows")
    parser.add_argument("--test-rows", type=int, default=32, help="test rows (eval cost)")
    parser.add_argument("--users", type=int, default=8, help="users of the synthetic run")
    parser.add_argument("--adapted-layers", type=int, default=None, help="default: 4 of SmolLM2's 30, 1 of tiny's 2")
    parser.add_argument("--cells", type=int, default=9, help="cells of a grid (the paper's matrix has 9)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_trunk.") as tmp:
        tmp = Path(tmp)
        run = make_run(tmp, args.users, seed=0)
        model, tokenizer = load_model(args.model, tmp)
        answer, fit = answer_tokens(tokenizer), FitToLength(tokenizer, getattr(tokenizer, "max_seq_len", None))
        sets = {}
        for split, n in (("train", args.rows), ("test", args.test_rows)):
            rows = load_prompt_rows(run, split=split, memory="ms", subsample=n, template="compact", state_numbers=True)
            sets[split] = ([encode_prompt(fit, p, answer) for p in rows.parts], rows["user_id"].tolist(),
                           rows["rating"].astype(int).tolist())
        prompts, users, ratings = sets["train"]
        tokens = sum(map(len, prompts))
        adapted = args.adapted_layers or (4 if args.model == "smollm2" else 1)

        stock_model, _ = load_model(args.model, tmp)
        stock_s = stock_epoch(stock_model, tokenizer, answer, prompts, ratings)
        del stock_model

        split = split_layer(model, adapted)
        model.eval()
        cache = TrunkCache(tmp / "cache", {"bench": args.model, "split": split})
        _, cache_s = timed(lambda: cache.build(model, split, prompts, users, progress=False), "trunk cache (train)")
        params = with_lora(model, ["q_proj", "k_proj", "v_proj", "output_proj"], range(split, len(model.layers)))
        head = RatingHead(model.norm.scale.shape[0], answer.rating_ids)
        optimizer = torch.optim.AdamW(params + list(head.parameters()), lr=3e-4)
        ids = torch.tensor(answer.rating_ids)

        def trunk_epoch():
            model.train()
            for step in tree_batches(users, rows_per_tree=8, trees_per_step=2, seed=0):
                trees = make_trees([cache.tree(users[t[0]], [prompts[i] for i in t]) for t in step])
                logits, _ = top_forward(model, split, trees, head)
                target = torch.tensor([ratings[r] for t in step for r in t])
                rating_loss(logits, target, ids, "mse").backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        _, train_s = timed(trunk_epoch, "trunk epoch")
        with full_last_layer():
            _, train_full_s = timed(trunk_epoch, "trunk epoch, last layer at every position")

        test_prompts, test_users, _ = sets["test"]
        model.eval()
        _, test_cache_s = timed(lambda: cache.build(model, split, test_prompts, test_users, progress=False),
                                "trunk cache (test)")

        def score_cell():
            with torch.no_grad():
                for step in tree_batches(test_users, 64, 1, seed=0, shuffle=False):  # as the recipe's eval
                    trees = make_trees([cache.tree(test_users[t[0]], [test_prompts[i] for i in t]) for t in step])
                    top_forward(model, split, trees, head)

        _, cell_s = timed(score_cell, "score one cell")
        with full_last_layer():
            _, cell_full_s = timed(score_cell, "score one cell, last layer at every position")
        cache_mib = round(cache.size_bytes() / 2**20, 2)

    results = {
        "model": args.model, "train_rows": len(prompts), "train_prompt_tokens": tokens,
        "mean_prompt_tokens": round(tokens / len(prompts), 1), "adapted_layers": adapted,
        "layers": len(model.layers), "threads": args.threads,
        "stock": {"epoch_cpu_s": round(stock_s, 2), "tokens_per_s": round(tokens / stock_s, 1)},
        "trunk": {"cache_cpu_s": round(cache_s, 2), "epoch_cpu_s": round(train_s, 2),
                  "tokens_per_s_per_epoch": round(tokens / train_s, 1),
                  "tokens_per_s_first_epoch_with_cache": round(tokens / (cache_s + train_s), 1),
                  "epoch_cpu_s_last_layer_at_every_position": round(train_full_s, 2),
                  "cache_mib_train_and_test": cache_mib},
        "ratios": {
            "epoch_tokens_per_s_vs_stock": round(stock_s / train_s, 2),
            "first_epoch_with_cache_vs_stock": round(stock_s / (cache_s + train_s), 2),
            "extra_variant_cost_vs_stock": round(train_s / stock_s, 3),
            "two_epoch_variant_with_cache_vs_stock": round((cache_s + 2 * train_s) / (2 * stock_s), 3),
            "all_cells_vs_one_cell": round((test_cache_s + args.cells * cell_s) / (test_cache_s + cell_s), 2),
            "all_cells_vs_one_cell_last_layer_at_every_position":
                round((test_cache_s + args.cells * cell_full_s) / (test_cache_s + cell_full_s), 2),
            "epoch_speedup_answer_only_last_layer": round(train_full_s / train_s, 2),
            "cell_speedup_answer_only_last_layer": round(cell_full_s / cell_s, 2),
        },
        "eval": {"test_rows": len(test_prompts), "test_cache_cpu_s": round(test_cache_s, 2),
                 "cell_cpu_s": round(cell_s, 2), "cell_cpu_s_last_layer_at_every_position": round(cell_full_s, 2),
                 "cells": args.cells},
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
