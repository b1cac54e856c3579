#!/usr/bin/env bash
# One visit to a GPU machine: the CUDA measurements of issues 12 (embedding) and 13 (training), prepared so
# a short loan is spent measuring, each step under its own time limit. From the checkout's root, after the
# bundle's set-up (../shared/GPU.md; ../shared/tools/gpu-bundle.sh writes .devwork/):
#
#   bash .devwork/gpu-env.sh && . /tmp/gnnst-env.sh && bash benchmarks/gpu_visit.sh [STEP ...]
#
# STEP (default: build train spread scale embed, in that order; the most wanted figures first):
#   build  cold then warm `gnnst build-graphs` of her2st-6 with the encoder on the GPU (issue 12's < 10 s)
#   train  `gnnst train --graphs` on those graphs, 6 folds x the default ensemble, final model off (issue 13's < 45 s)
#   spread the same under torchrun, GNNST_VISIT_RANKS (3) ranks sharing the GPU (train.distributed: folds, gloo)
#   scale  benchmarks/scale.py on the GPU: one epoch at 10k / 100k / 1M spots, both samplers (issue 13's < 9 s at 1M)
#   embed  benchmarks/embed.py on the GPU: the encoder alone vs the whole build, bfloat16 drift, a foundation model
# Every step's output is in $OUT (default runs/gpu_visit): <step>.log, <step>.smi.csv (nvidia-smi samples of
# GPU utilisation and memory every 0.2 s), steps.tsv (step, exit status, seconds), and a copy of
# benchmarks/RESULTS.md and benchmarks/results/ after each step (the sections the benchmarks wrote there).
# Large files (graphs, caches, runs) stay in $WORK (default /tmp/gnnst_visit), never in $OUT.
#
# Knobs (environment): GNNST_VISIT_DEVICE (default cuda; cpu rehearses the script on a machine without a
# GPU), GNNST_VISIT_QUICK=1 (one fold, two epochs, 10k spots only, few batches, RESULTS.md left as it is:
# a rehearsal, its figures mean nothing), GNNST_VISIT_LIMITS="build=120 train=240 spread=180 scale=240 embed=180" (seconds per step;
# on a CPU, the defaults are 5 times these), PYTHON.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_visit}
WORK=${WORK:-/tmp/gnnst_visit}
PY=${PYTHON:-python3}
DEV=${GNNST_VISIT_DEVICE:-cuda}
QUICK=${GNNST_VISIT_QUICK:-0}
declare -A LIMIT=([build]=120 [train]=240 [spread]=180 [scale]=240 [embed]=180)
# a rehearsal on a CPU is not spending a GPU loan, and its steps are slower (embed runs a ViT-L there): 5x
[ "$DEV" = cpu ] && for s in "${!LIMIT[@]}"; do LIMIT[$s]=$((LIMIT[$s] * 5)); done
for kv in ${GNNST_VISIT_LIMITS:-}; do LIMIT[${kv%%=*}]=${kv#*=}; done
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build train spread scale embed)
mkdir -p "$OUT" "$WORK"
NOTE="one visit (benchmarks/gpu_visit.sh) on $(hostname), device $DEV$([ "$QUICK" = 1 ] && echo ', QUICK rehearsal: figures not meaningful')"

smi_start() {  # GPU utilisation and memory every 0.2 s while a step runs (nothing without nvidia-smi)
  SMI=
  if command -v nvidia-smi >/dev/null 2>&1 && [ "$DEV" != cpu ]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
      > "$OUT/$1.smi.csv" 2>/dev/null &
    SMI=$!
  fi
}
smi_stop() { [ -n "$SMI" ] && kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null; SMI=; }

run_step() {  # name, then the command; output in $OUT/name.log, status in steps.tsv
  local name=$1; shift
  local limit=${LIMIT[$name]}
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/$name.log"
  smi_start "$name"
  local t0=$(date +%s%N)
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  smi_stop
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%s\t%d.%03d\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) | tee -a "$OUT/steps.tsv"
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
  mkdir -p "$OUT/results" && cp benchmarks/results/*.json "$OUT/results/" 2>/dev/null
  return 0  # the next step runs whatever this one did
}

step_build() {
  rm -rf "$WORK/cache" "$WORK/graphs"
  run_step build bash -c "
    /usr/bin/time -v $PY -m gnnst build-graphs --config configs/her2st.yaml --out $WORK/graphs --cache-dir $WORK/cache \
      --quiet encoder.device=$DEV && echo '-- cold build done' &&
    /usr/bin/time -v $PY -m gnnst build-graphs --config configs/her2st.yaml --out $WORK/graphs --cache-dir $WORK/cache \
      --quiet --overwrite encoder.device=$DEV && echo '-- warm build done' && tail -n 3 $WORK/graphs/build.log"
}

train_step() {  # name, launcher words: her2st-6 cross-validation on the built graphs, final model off
  local name=$1; shift
  [ -f "$WORK/graphs/dataset.json" ] || { echo "$name: no graphs in $WORK/graphs (run the build step first)" \
    | tee -a "$OUT/$name.log"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"; return 0; }
  local extra=()
  [ "$QUICK" = 1 ] && extra=("eval.only_folds=[B4]" "train.epochs=2" "train.ensemble=2")
  [ "$DEV" = cpu ] && [ "$name" = spread ] && extra+=("train.num_threads=1")
  rm -rf "$WORK/$name"
  run_step "$name" bash -c "
    /usr/bin/time -v $* -m gnnst train --graphs $WORK/graphs --config configs/her2st.yaml --out $WORK/$name \
      --cache-dir $WORK/cache --quiet train.device=$DEV encoder.device=$DEV eval.final_model=false ${extra[*]} &&
    grep -E 'fold .*: PCC|INFO (train|sampler|rank)' $WORK/$name/train.log | cut -c1-220 &&
    $PY -c \"import json; m = json.load(open('$WORK/$name/metrics.json')); \
print('summary', json.dumps(m['summary'])); print('seconds_total', m['seconds_total']); \
print('fold_seconds', [round(f['fold_seconds'], 1) for f in m['folds']]); \
print('train_seconds', [round(f['train_seconds'], 1) for f in m['folds']])\""
}

step_train() { train_step train "$PY"; }

# the same, its folds and members spread over RANKS torchrun processes sharing the one GPU (folds mode, gloo)
step_spread() { train_step spread "$PY" -m torch.distributed.run --standalone --nproc_per_node "${GNNST_VISIT_RANKS:-3}"; }

step_scale() {
  local sizes=(10000 100000 1000000) steps=()
  [ "$QUICK" = 1 ] && sizes=(10000) && steps=(--max-step-batches 3 --no-write)
  run_step scale "$PY" benchmarks/scale.py --device "${DEV%%:*}" --sizes "${sizes[@]}" "${steps[@]}" --note "$NOTE"
}

step_embed() {
  local extra=()
  [ "$QUICK" = 1 ] && extra=(--repeats 1 --batches 2 --fm-batches 1 --cohort 2x50 --workers 0 --no-write)
  run_step embed "$PY" benchmarks/embed.py --device "$DEV" --fm-slides C3 "${extra[@]}" --note "$NOTE"
}

echo "gnnst GPU visit: steps ${STEPS[*]}, device $DEV, quick $QUICK, out $OUT, work $WORK" | tee "$OUT/visit.txt"
{ date -u; git rev-parse HEAD 2>/dev/null; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"
  nvidia-smi 2>/dev/null | head -15; nproc; free -g | head -2; } >> "$OUT/visit.txt" 2>&1
for s in "${STEPS[@]}"; do
  case $s in
    build|train|spread|scale|embed) "step_$s" ;;
    *) echo "unknown step '$s' (known: build train spread scale embed)"; exit 2 ;;
  esac
done
cat "$OUT/steps.tsv"
