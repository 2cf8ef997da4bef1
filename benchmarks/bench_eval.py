"""Benchmark the evaluation core: batched, prefix-cached prediction vs the paper's per-row loop.

On the same model and the same test rows (a synthetic run, memory M_s+M_l, the prompts training uses):
- naive:    one row at a time, torchtune's ``generate`` (KV cache) for 4 tokens at T=0.3, then the
            regex: the paper's path, no batching, no prefix reuse;
- scoring:  persona_tune.evaluation.predict, batched, each user's shared prefix run once;
- scoring without prefix reuse, and batched paper mode (generation) with prefix reuse.
Reports rows/s, the ratio to naive, URR, and the tokens per row a forward pass processes: the full
prompt (no reuse), with reuse (padding included), and the prefix-shared floor (each user's prefix
once plus every suffix). One run, all variants interleaved in one process, so the ratios share the
machine's conditions. Times are CPU seconds of the process (one torch thread by default), which a
shared, loaded machine distorts far less than wall time.

    python benchmarks/bench_eval.py --model tiny --rows 120
    python benchmarks/bench_eval.py --model smollm2 --rows 60
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from persona_tune.evaluation.predict import GenerationConfig, RatingPredictor
from persona_tune.prompts import load_prompt_rows

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.naive_loop import naive_generate  # noqa: E402 (the paper's loop, the reference)


def make_run(root: Path, n_users: int, seed: int) -> Path:
    from persona_tune.distill import run as distill
    from persona_tune.memory import stage as embed
    from persona_tune.runfolder import RunFolder
    from tests.fixtures_runs import make_prepared_run

    run = make_prepared_run(root, n_users=n_users, seed=seed)
    distill.run(RunFolder(run), distill.DistillConfig(backend="offline"))
    embed.run(RunFolder(run), embed.EmbedConfig(backend="hash"))
    return run


def load_model(name: str, root: Path):
    from torchtune.training import MODEL_KEY, FullModelHFCheckpointer

    if name == "tiny":
        from persona_tune.models.tiny import tiny_phi3, tiny_phi3_tokenizer, write_tiny_phi3

        folder = write_tiny_phi3(root / "tiny", seed=0)
        model, model_dir, files, kind = tiny_phi3(), folder / "model", ["model.safetensors"], "PHI3_MINI"
        tokenizer = tiny_phi3_tokenizer(str(folder / "tokenizer" / "tokenizer.model"), max_seq_len=2048)
    else:
        from persona_tune.models.smollm2 import ensure_smollm2, smollm2_135m, smollm2_tokenizer

        folder = ensure_smollm2()
        model, model_dir, files, kind = smollm2_135m(), folder / "model", ["model.safetensors"], "LLAMA3_2"
        tokenizer = smollm2_tokenizer(str(folder / "tokenizer"), max_seq_len=1024)
    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(model_dir), checkpoint_files=files, model_type=kind,
                                   output_dir=str(root / "ckpt_out"))
    model.load_state_dict(ckpt.load_checkpoint()[MODEL_KEY])
    return model.eval(), tokenizer


def timed(fn, label=""):
    """(result, CPU seconds of this process). With one torch thread, CPU time is the work done,
    largely independent of other load on a shared machine; wall time is printed too."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if label:
        print(f"{label}: {cpu:.1f} s CPU, {wall:.1f} s wall", file=sys.stderr, flush=True)
    return out, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rows", type=int, default=120, help="test rows (drawn evenly from each user)")
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--skip-no-reuse", action="store_true", help="skip the batched-without-prefix-reuse run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_eval.") as tmp:
        root = Path(tmp)
        run = make_run(root, args.users, args.seed)
        model, tokenizer = load_model(args.model, root)
        model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
        rows = load_prompt_rows(run, split="test", memory="ms+ml", subsample=args.rows, seed=args.seed)
        groups = rows["user_id"].tolist()
        keys = [f"{u}:{i}" for u, i in zip(rows.user_id, rows.item_id)]
        gen = GenerationConfig()  # 4 tokens, T=0.3, top-k 50: the paper's decoding

        def predictor(share_prefix=True):
            return RatingPredictor(model, tokenizer, batch_size=args.batch_size, share_prefix=share_prefix,
                                   progress=False)

        encoder = predictor()
        prompts, t_encode = timed(lambda: encoder.encode(rows["parts"]))
        results = {"model": args.model, "rows": len(rows), "users": rows["user_id"].nunique(),
                   "threads": args.threads, "batch_size": args.batch_size, "dtype": args.dtype, "encode_s": round(t_encode, 2)}

        # Warm up every path once on a few rows (first calls allocate and initialise kernels).
        warm = slice(0, 4)
        naive_generate(model, tokenizer, prompts[warm], keys[warm], gen, progress=False)
        predictor().score(prompts[warm], groups[warm])
        predictor().generate(prompts[warm], groups[warm], keys[warm], gen)

        naive, t_naive = timed(lambda: naive_generate(model, tokenizer, prompts, keys, gen, progress=False), "naive")
        shared = predictor()
        scored, t_scoring = timed(lambda: shared.score(prompts, groups), "scoring")
        flat = predictor(share_prefix=False)
        t_flat = math.nan if args.skip_no_reuse else timed(lambda: flat.score(prompts, groups), "scoring, no prefix reuse")[1]
        gen_pred = predictor()
        generated, t_gen = timed(lambda: gen_pred.generate(prompts, groups, keys, gen), "batched generate")

        n = len(rows)
        stats = shared.stats.as_dict()
        results.update({
            "naive_generate": {"cpu_seconds": round(t_naive, 2), "rows_per_s": round(n / t_naive, 2),
                               "urr": float(naive["parsed_rating"].isna().mean())},
            "batched_scoring": {"cpu_seconds": round(t_scoring, 2), "rows_per_s": round(n / t_scoring, 2),
                                "urr": float(scored["expected_rating"].isna().mean()),
                                "speedup_vs_naive": round(t_naive / t_scoring, 2)},
            "batched_scoring_no_prefix_reuse": {"cpu_seconds": round(t_flat, 2), "rows_per_s": round(n / t_flat, 2),
                                                "speedup_vs_naive": round(t_naive / t_flat, 2)},
            "batched_generate": {"cpu_seconds": round(t_gen, 2), "rows_per_s": round(n / t_gen, 2),
                                 "urr": float(generated["parsed_rating"].isna().mean()),
                                 "speedup_vs_naive": round(t_naive / t_gen, 2),
                                 "same_text_as_naive": float((generated["raw_text"] == naive["raw_text"]).mean())},
            "tokens_per_row": {"without_reuse": round(stats["prompt_tokens_per_row"], 1),
                               "with_reuse": round(stats["tokens_per_row"], 1),
                               "prefix_shared_floor": round(stats["floor_tokens_per_row"], 1),
                               "with_reuse_over_floor": round(stats["tokens_per_row"] / stats["floor_tokens_per_row"], 3)},
        })
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
