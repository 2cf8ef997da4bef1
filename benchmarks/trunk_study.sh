#!/usr/bin/env bash
# The frozen-trunk study on real MovieLens-1M (docs/results.md): SmolLM2-135M-Instruct on a 2-core CPU.
# Every call resumes (trained variants are skipped, the trunk cache keeps finished users, a stopped
# training run continues from its last saved step), so the whole script can be killed and re-run.
#   bash benchmarks/trunk_study.sh [RUN] [STAGE...]
# Needs the run of benchmarks/real_run.sh's first five commands (prepare, distill, embed, personas, baselines).
set -euo pipefail
RUN=${1:-runs/ml1m}
shift || true
STAGES=${*:-"main ablations single_min memory layers template more curve middle report"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
GRID=(persona-tune grid --run "$RUN" --family smollm2 --path trunk --n-boot 1000)
# Every cell scores the same 2,000 test rows (eval.max_rows, drawn over all users with eval.seed 0).

for stage in $STAGES; do case $stage in
main)
  # The base model (no adapter, no head).
  "${GRID[@]}" --cells prompted-ms
  # 1,000 training rows (M_s, compact prompt with the stated numbers, top 4 layers): the LM alone
  # (the head reads the final features), and the head that also reads the stated numbers; each with
  # LoRA training (2 epochs), and its closed-form start alone (0 epochs).
  "${GRID[@]}" --label n1000 --train-rows 1000 --cells single_max-ms
  "${GRID[@]}" --label n1000-prior --train-rows 1000 --cells single_max-ms,persona-ms -- head.prior=stated \
      eval.paper_rows=200
  "${GRID[@]}" --label n1000-probe --train-rows 1000 --cells single_max-ms -- epochs=0
  "${GRID[@]}" --label n1000-prior-probe --train-rows 1000 --cells single_max-ms -- epochs=0 head.prior=stated
  # The learning curve below and above: 250 and 4,000 rows.
  "${GRID[@]}" --label n250 --train-rows 250 --cells single_max-ms
  "${GRID[@]}" --label n250-prior --train-rows 250 --cells single_max-ms -- head.prior=stated
  ;;
ablations)
  # At 1,000 rows, the LM alone: the paper's objective, the paper's model (no head, cross-entropy),
  # and a head that starts at zero.
  "${GRID[@]}" --label n1000-ce --train-rows 1000 --cells single_max-ms -- objective=ce
  "${GRID[@]}" --label n1000-nohead-ce --train-rows 1000 --cells single_max-ms -- head.init=none objective=ce
  "${GRID[@]}" --label n1000-zerohead --train-rows 1000 --cells single_max-ms -- head.init=zero
  ;;
single_min)
  # Persona vs single: theta_single(min) (the smallest persona's share of the 1,000 rows), prior head.
  "${GRID[@]}" --label n1000-prior --train-rows 1000 --cells single_min-ms -- head.prior=stated
  ;;
template)
  # The paper's prompt template (Appendix C's wording, about twice the tokens): the prior head and the LM
  # alone (one trunk pass over the template's rows serves both: the cache keeps each template's rows).
  "${GRID[@]}" --label n1000-prior-paper --train-rows 1000 --cells single_max-ms -- head.prior=stated \
      prompt_template=paper
  "${GRID[@]}" --label n1000-paper --train-rows 1000 --cells single_max-ms -- prompt_template=paper
  ;;
memory)
  # Memory: M_s + the top-4 retrieved explanations M_l, at 1,000 rows: the prior head and the LM alone.
  "${GRID[@]}" --label n1000-prior --train-rows 1000 --cells single_max-msml -- head.prior=stated
  "${GRID[@]}" --label n1000 --train-rows 1000 --cells single_max-msml
  ;;
layers)
  # Adapted layers: the top 8 of 30 (the cache splits at layer 22: a cache folder of its own). One
  # training process per run folder: to run this beside the other stages, use a copy of the run folder
  # and copy RUN/eval/trunk-n1000-prior-l8-single_max-ms back before `report`.
  "${GRID[@]}" --label n1000-prior-l8 --train-rows 1000 --cells single_max-ms -- head.prior=stated \
      adapted_layers=8
  ;;
more)
  # The learning curve at 4,000 rows: the closed-form heads first (cheap once the cache holds the rows),
  # then LoRA training.
  "${GRID[@]}" --label n4000-prior-probe --train-rows 4000 --cells single_max-ms -- epochs=0 head.prior=stated
  "${GRID[@]}" --label n4000-probe --train-rows 4000 --cells single_max-ms -- epochs=0
  "${GRID[@]}" --label n4000-prior --train-rows 4000 --cells single_max-ms -- head.prior=stated
  "${GRID[@]}" --label n4000 --train-rows 4000 --cells single_max-ms
  "${GRID[@]}" --label n4000-prior --train-rows 4000 --cells persona-ms -- head.prior=stated
  ;;
curve)
  # The learning curve of the closed-form heads (0 epochs) for θ_single(max) and θ_persona at 250,
  # 1,000, 4,000 and every training row (16,521; a trunk pass over ~12,500 more rows), and θ_persona
  # with training at 250 rows (1,000 is in main) and at every row.
  for n in 250 1000 4000 all; do
    "${GRID[@]}" --label n$n-prior-probe --train-rows $n --cells single_max-ms,persona-ms -- epochs=0 \
        head.prior=stated
  done
  "${GRID[@]}" --label n250-probe --train-rows 250 --cells single_max-ms -- epochs=0
  for n in 250 1000 4000; do
    "${GRID[@]}" --label n$n-probe --train-rows $n --cells persona-ms -- epochs=0
  done
  "${GRID[@]}" --label nall-probe --train-rows all --cells single_max-ms,persona-ms -- epochs=0
  "${GRID[@]}" --label n250-prior --train-rows 250 --cells persona-ms -- head.prior=stated
  # Two LoRA epochs on every training row, on the closed-form head (with the stated numbers, and alone).
  "${GRID[@]}" --label nall-prior --train-rows all --cells single_max-ms,persona-ms -- head.prior=stated
  "${GRID[@]}" --label nall --train-rows all --cells single_max-ms
  ;;
collab)
  # Beyond the bias baseline (docs/results.md, issue 24), on a run prepared with the leak-free history
  # (prepare --history before_split, the default): collaborative memories and a head that reads the
  # bias and item-kNN numbers (head.prior=collab). CPU budget of the 2026-12-06 session (2 cores shared
  # by several jobs, ~1.5 trunk rows/s): 1 collaborative memory (the most similar film the user rated)
  # and the COLLAB line without the NUMBERS line (82 prompt tokens per row against 172 with 5 memories
  # and both lines; the trunk pass costs in proportion). Every cell scores the other cells' 2,000 test
  # rows. Most informative first: θ_single(max)'s closed-form head (0 epochs; the features' and the
  # numbers' L2 weights chosen by 5-fold cross-validation over users), then on the same cached rows
  # the LM alone (its head reads the final state only) and θ_persona; then 4,000 training rows (about
  # 3,000 more rows through the trunk), then LoRA (collab_lora).
  C=(collab_memories=1 state_numbers=False eval.max_rows=2000)
  "${GRID[@]}" --label n1000-collab-probe --train-rows 1000 --cells single_max-ms -- "${C[@]}" epochs=0 \
      head.prior=collab
  "${GRID[@]}" --label n1000-collab-lm-probe --train-rows 1000 --cells single_max-ms -- "${C[@]}" epochs=0
  "${GRID[@]}" --label n1000-collab-probe --train-rows 1000 --cells persona-ms -- "${C[@]}" epochs=0 \
      head.prior=collab
  "${GRID[@]}" --label n4000-collab-probe --train-rows 4000 --cells single_max-ms,persona-ms -- "${C[@]}" \
      epochs=0 head.prior=collab
  # The base model reading the same prompts (no training, no head): its rating-token distribution.
  "${GRID[@]}" --label collab --cells prompted-ms -- "${C[@]}"
  ;;
collab_lora)
  # One training process per run folder: to run these beside `collab`, use a copy of the run folder and
  # copy its RUN/eval/trunk-*collab* cells back before `collab_report`.
  C=(collab_memories=1 state_numbers=False eval.max_rows=2000)
  "${GRID[@]}" --label n1000-collab --train-rows 1000 --cells single_max-ms -- "${C[@]}" head.prior=collab
  "${GRID[@]}" --label n1000-collab-lm --train-rows 1000 --cells single_max-ms -- "${C[@]}"
  "${GRID[@]}" --label n1000-collab --train-rows 1000 --cells persona-ms -- "${C[@]}" head.prior=collab
  # 4,000 rows: 2 LoRA epochs on the CV heads (about 4x the 1,000-row cells' time each).
  "${GRID[@]}" --label n4000-collab --train-rows 4000 --cells single_max-ms,persona-ms -- "${C[@]}" \
      head.prior=collab
  ;;
collab_all)
  # Every training row (16,521; about 12,500 more rows through the trunk, some 80 minutes on one thread
  # here, resumable: the cache keeps finished users), closed-form heads.
  C=(collab_memories=1 state_numbers=False eval.max_rows=2000)
  "${GRID[@]}" --label nall-collab-probe --train-rows all --cells persona-ms,single_max-ms -- "${C[@]}" \
      epochs=0 head.prior=collab
  ;;
collab_report)
  # Every cell against the bias baseline and the classical references (paired.bias, paired.knn,
  # paired.mf), and each step against the one before it on the same rows (the pairs whose cells ran).
  P1=trunk-n1000-collab-probe P4=trunk-n4000-collab-probe T1=trunk-n1000-collab T4=trunk-n4000-collab
  LM1=trunk-n1000-collab-lm PA=trunk-nall-collab-probe
  PAIRS=($P1-single_max-ms:trunk-n1000-collab-probe-oldhead-single_max-ms
         $P4-single_max-ms:$P1-single_max-ms $P1-persona-ms:$P1-single_max-ms $P4-persona-ms:$P4-single_max-ms
         $P4-persona-ms:$P1-persona-ms
         $P1-single_max-ms:$LM1-probe-single_max-ms $T1-single_max-ms:$P1-single_max-ms
         $T1-persona-ms:$T1-single_max-ms $T1-persona-ms:$P1-persona-ms
         $LM1-single_max-ms:$LM1-probe-single_max-ms $T1-single_max-ms:$LM1-single_max-ms
         $LM1-single_max-ms:trunk-collab-prompted-ms
         $T4-single_max-ms:$P4-single_max-ms $T4-single_max-ms:$T1-single_max-ms
         $T4-persona-ms:$T4-single_max-ms $T4-persona-ms:$P4-persona-ms
         $PA-single_max-ms:$P4-single_max-ms $PA-persona-ms:$P4-persona-ms $PA-persona-ms:$PA-single_max-ms)
  COMPARE=()
  for pair in "${PAIRS[@]}"; do
    [ -f "$RUN/eval/${pair%%:*}/metrics.json" ] && [ -f "$RUN/eval/${pair##*:}/metrics.json" ] \
      && COMPARE+=(--compare "$pair")
  done
  persona-tune report --run "$RUN" --json-out docs/results/ml1m-beyond-bias.json "${COMPARE[@]}"
  sed 's|!\[elbow\](plots/elbow.png)||; s|(plots/calibration.png)|(results-ml1m-beyond-bias-calibration.png)|
       s|(plots/paired.png)|(results-ml1m-beyond-bias-paired.png)|
       s|(plots/learning_curve.png)|(results-ml1m-beyond-bias-learning-curve.png)|
       s|!\[[a-z_]*\](plots/[a-z_]*.png)||' \
      "$RUN/eval/report.md" > docs/results-ml1m-beyond-bias.md
  for plot in calibration paired learning_curve; do  # the learning curve needs two training sizes
    [ -f "$RUN/eval/plots/$plot.png" ] && cp "$RUN/eval/plots/$plot.png" "docs/results-ml1m-beyond-bias-${plot//_/-}.png"
  done
  # The numbers alone through the head's closed form, on the cells' 2,000 test rows.
  python benchmarks/collab_numbers.py "$RUN" --test-rows 2000 --train-rows 1000 4000 \
      --into docs/results/ml1m-beyond-bias.json
  ;;
middle)
  # Adaptation from a middle layer: the LM alone with LoRA on the top 14 of 30 layers (the cache splits
  # at layer 16, where the stated numbers are most readable), 1,000 rows.
  "${GRID[@]}" --label n1000-l14 --train-rows 1000 --cells single_max-ms -- adapted_layers=14
  ;;
report)
  # Each ablation against its reference on the same rows, paired over users (A:B, A minus B).
  PRIOR=trunk-n1000-prior-single_max-ms LM=trunk-n1000-single_max-ms
  persona-tune report --run "$RUN" --json-out docs/results/ml1m-smollm2.json \
      --compare $PRIOR:$LM \
      --compare trunk-n1000-prior-probe-single_max-ms:$PRIOR --compare trunk-n1000-prior-persona-ms:$PRIOR \
      --compare trunk-n1000-prior-single_min-ms:$PRIOR --compare trunk-n1000-prior-l8-single_max-ms:$PRIOR \
      --compare trunk-n1000-prior-single_max-msml:$PRIOR --compare trunk-n1000-single_max-msml:$LM \
      --compare trunk-n1000-prior-paper-single_max-ms:$PRIOR --compare trunk-n1000-paper-single_max-ms:$LM \
      --compare trunk-n1000-ce-single_max-ms:$LM --compare trunk-n1000-zerohead-single_max-ms:$LM \
      --compare trunk-n1000-nohead-ce-single_max-ms:$LM --compare trunk-n1000-probe-single_max-ms:$LM \
      --compare trunk-n4000-probe-single_max-ms:trunk-n1000-probe-single_max-ms \
      --compare trunk-n4000-prior-probe-single_max-ms:trunk-n1000-prior-probe-single_max-ms \
      --compare trunk-nall-probe-single_max-ms:trunk-n4000-probe-single_max-ms \
      --compare trunk-nall-prior-probe-single_max-ms:trunk-n4000-prior-probe-single_max-ms \
      --compare trunk-n4000-prior-single_max-ms:trunk-n4000-prior-probe-single_max-ms \
      --compare trunk-n4000-single_max-ms:trunk-n4000-probe-single_max-ms \
      --compare trunk-n1000-prior-probe-persona-ms:trunk-n1000-prior-probe-single_max-ms \
      --compare trunk-nall-prior-probe-persona-ms:trunk-nall-prior-probe-single_max-ms \
      --compare trunk-nall-probe-persona-ms:trunk-nall-probe-single_max-ms \
      --compare trunk-n1000-probe-persona-ms:trunk-n1000-probe-single_max-ms \
      --compare trunk-n4000-probe-persona-ms:trunk-n4000-probe-single_max-ms \
      --compare trunk-nall-prior-single_max-ms:trunk-nall-prior-probe-single_max-ms \
      --compare trunk-nall-prior-persona-ms:trunk-nall-prior-single_max-ms \
      --compare trunk-nall-single_max-ms:trunk-nall-probe-single_max-ms \
      --compare trunk-n4000-prior-persona-ms:trunk-n4000-prior-single_max-ms \
      --compare trunk-n1000-l14-single_max-ms:$LM
  cp "$RUN/eval/report.md" docs/results-ml1m-trunk.md
  cp "$RUN/eval/plots/learning_curve.png" docs/results-ml1m-learning-curve.png
  cp "$RUN/eval/plots/calibration.png" docs/results-ml1m-trunk-calibration.png
  ;;
esac; done
