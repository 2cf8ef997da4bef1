#!/usr/bin/env bash
# The frozen-trunk study on real MovieLens-1M (docs/results.md): SmolLM2-135M-Instruct on a 2-core CPU.
# Every call resumes (trained variants are skipped, the trunk cache keeps finished users, a stopped
# training run continues from its last saved step), so the whole script can be killed and re-run.
#   bash benchmarks/trunk_study.sh [RUN] [STAGE...]
# Needs the run of benchmarks/real_run.sh's first five commands (prepare, distill, embed, personas, baselines).
set -euo pipefail
RUN=${1:-runs/ml1m}
shift || true
STAGES=${*:-"main ablations"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
GRID=(persona-tune grid --run "$RUN" --family smollm2 --path trunk --n-boot 1000)
# Every cell scores the same 2,000 test rows (eval.max_rows, drawn over all users with eval.seed 0).

for stage in $STAGES; do case $stage in
main)
  # The base model (no adapter, no head).
  "${GRID[@]}" --cells prompted-ms
  # Learning curve, M_s: theta_single on N training rows drawn over all users; at 4,000 rows also the
  # closed-form head alone (no LoRA training); with all rows theta_single and theta_persona.
  for n in 1000 4000; do
    "${GRID[@]}" --label n$n --cells single_max-ms --train-rows $n
  done
  "${GRID[@]}" --label n4000-probe --cells single_max-ms --train-rows 4000 --train-set epochs=0
  "${GRID[@]}" --label nall --cells single_max-ms,persona-ms --train-rows all
  ;;
ablations)
  # At 4,000 rows (M_s): the objective, the head's start, the adapted layers, the prompt.
  "${GRID[@]}" --label n4000-ce --cells single_max-ms --train-rows 4000 --train-set objective=ce
  "${GRID[@]}" --label n4000-zerohead --cells single_max-ms --train-rows 4000 --train-set head.init=zero
  "${GRID[@]}" --label n4000-nohead-ce --cells single_max-ms --train-rows 4000 --train-set head.init=none \
      --train-set objective=ce
  "${GRID[@]}" --label n4000-nonumbers --cells single_max-ms --train-rows 4000 --train-set state_numbers=false
  "${GRID[@]}" --label n4000-top8 --cells single_max-ms --train-rows 4000 --train-set adapted_layers=8
  # Memory: M_s+M_l, the base model and at 1,000 and 4,000 rows.
  "${GRID[@]}" --cells prompted-msml
  for n in 1000 4000; do
    "${GRID[@]}" --label n$n --cells single_max-msml --train-rows $n
  done
  ;;
report)
  persona-tune report --run "$RUN" --json-out docs/results/ml1m-smollm2.json
  ;;
esac; done
