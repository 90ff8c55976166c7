#!/usr/bin/env bash
# Everything docs/performance.md measures on a GPU, in one call on a fresh H100/H200 with the device image
# (Python 3.12, torch, triton, transformers, pytest-benchmark; no network):
#
#     bash benchmarks/gpu_suite.sh OUTDIR        (from the checkout's root; e.g. OUTDIR=$OUT)
#
# Stages, most important first, each under its own time limit inside a total budget of
# SUITE_BUDGET_S seconds (default 460, so the whole call stays under 8 minutes); a stage
# that no longer fits is skipped and says so, and the files are written whatever happens:
#   install   the checkout, editable, no downloads (the C++ extension is built here)
#   tests     GPU correctness: pytest -m gpu (kernels at bf16, run during the install; then
#             the step switches, the stack graphs and the C++ autograd nodes against eager)
#   step      python -m d2v_fast.bench, data2vec base: d2v_fast, hf, reference at batch 32
#             and 64; data2vec2 base (8 clones): d2v_fast, reference at batch 8 (and 16,
#             last, if time is left), i.e. 64 and 128 clone rows; hf has no data2vec2
#   audio     python -m d2v_fast.bench --modality audio, base, 20 s crops: data2vec at batch 8,
#             data2vec2 at batch 4 (32 clone rows); d2v_fast and reference (into step.jsonl)
#   stack     data2vec base at batch 32 with the encoder stacks replayed as CUDA graphs
#             (--train.compile stack-cudagraphs)
#   ablation  data2vec base batch 64, one process: hf, then d2v_fast with every switch of
#             d2v_fast.steptimer.ABLATION on, each off in turn, all at their defaults
#   images    which SDPA kernel the v1 (BEiT) attention with its relative position bias runs
#             at bf16 with a gradient (printed to suite.log); the image step, ViT-B/16 at 224:
#             data2vec batch 64 and data2vec2 batch 16 (x 16 clones), d2v_fast and reference
#             (rows in step.jsonl)
#   kernels   benchmarks/test_kernels.py (not the torch.compile rows)
#   pretrain  the default job, 100 steps on the GPU
#   last, if time is left: hf and d2v_fast with every switch on at batch 32, then the same
#             with CUDA graphs of the compiled blocks (--train.compile blocks-cudagraphs); data2vec2
#             at batch 8 with the stacks as CUDA graphs, and at batch 16; d2v_fast at batch 64 with SDPA pinned to cuDNN and
#             memory-efficient attention (--train.attention); reference+compile at batch 32 (it compiles for about a minute and was
#             slower than reference on 2026-11-28)
#
# OUTDIR gets at most 6 files: suite.log (everything printed), step.jsonl (one JSON object
# per bench run: device, versions, date, rows), ablation.json, kernels.json,
# pretrain-metrics.jsonl and tests.txt.
set -u -o pipefail

OUTDIR=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-460}
DRY=${SUITE_DRY_RUN:-0}  # 1: print the commands instead of running them (syntax check on a CPU machine)
START=$(date +%s)
LOG="$OUTDIR/suite.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
export D2V_FAST_CACHE=${D2V_FAST_CACHE:-/tmp/d2v_fast-cache}

say() { echo "=== [t+$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S CMD...: run CMD (output to the log) under min(LIMIT_S, what is left).
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then
    say "$name: skipped, ${left}s of the ${BUDGET}s budget left"
    return 0
  fi
  (( limit > left )) && limit=$left
  say "$name (limit ${limit}s)"
  if [[ $DRY == 1 ]]; then
    printf '  %q' "$@" | tee -a "$LOG"
    echo | tee -a "$LOG"
    return 0
  fi
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  (( rc == 124 || rc == 137 )) && say "$name: stopped at its ${limit}s limit"
  (( rc != 0 )) && say "$name: exit status $rc"
  return 0
}

say "gpu_suite in $(pwd) -> $OUTDIR"
[[ $DRY == 1 ]] || { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$LOG"
  $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__)" 2>&1 | tee -a "$LOG"; }

# The kernel tests need no compiled extension: they run on the GPU while the CPUs build it.
KTESTS=/tmp/d2v_fast-suite-kernel-tests.txt
if [[ $DRY != 1 ]]; then
  say "tests-kernels (in the background, during the install)"
  PYTHONPATH=$(pwd) timeout 200 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py >"$KTESTS" 2>&1 &
  KPID=$!
fi
stage install 150 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e .
stage import 30 bash -c "cd / && $PY -c 'import d2v_fast._C, d2v_fast.ops; print(\"d2v_fast imports\")'"
if [[ $DRY != 1 ]]; then
  wait "$KPID"
  say "tests-kernels: exit status $?"
  cat "$KTESTS" | tee -a "$LOG" >"$OUTDIR/tests.txt"
fi
stage tests-switches 150 bash -c "$PY -m pytest -m gpu -q -p no:cacheprovider tests/test_step_switches.py tests/test_stack_graphs.py tests/test_native_autograd.py 2>&1 | tee -a '$OUTDIR/tests.txt'"

BENCH=($PY -m d2v_fast.bench --config base --seq-len 512 --data.num_workers 0)
TIMED=(--steps 10 --warmup 3)
stage step-d2v-32 60 "${BENCH[@]}" "${TIMED[@]}" --batch-size 32 --providers d2v_fast,hf,reference --json "$OUTDIR/step.jsonl"
stage step-d2v-64 60 "${BENCH[@]}" "${TIMED[@]}" --batch-size 64 --providers d2v_fast,hf,reference --json "$OUTDIR/step.jsonl"
# the encoder stacks replayed as CUDA graphs (--train.compile stack-cudagraphs) at batch 32, where
# the host's launches outlasted the GPU's work (2026-11-28); data2vec2 at batch 8 comes last
stage step-d2v-32-stack 75 "${BENCH[@]}" "${TIMED[@]}" --batch-size 32 --providers d2v_fast --train.compile stack-cudagraphs \
  --json "$OUTDIR/step.jsonl"
stage ablation 170 "${BENCH[@]}" --batch-size 64 --ablation --providers hf --steps 6 --warmup 2 --json "$OUTDIR/ablation.json"
stage step-d2v2 60 "${BENCH[@]}" "${TIMED[@]}" --recipe data2vec2 --batch-size 8 --providers d2v_fast,reference --json "$OUTDIR/step.jsonl"
# speech, base, 20 s crops (999 frames): data2vec at 8 utterances, data2vec2 at 4 (x 8 clones)
ABENCH=($PY -m d2v_fast.bench --modality audio --config base --data.num_workers 0)
stage step-audio-d2v 60 "${ABENCH[@]}" "${TIMED[@]}" --batch-size 8 --providers d2v_fast,reference --json "$OUTDIR/step.jsonl"
stage step-audio-d2v2 60 "${ABENCH[@]}" "${TIMED[@]}" --recipe data2vec2 --batch-size 4 --providers d2v_fast,reference --json "$OUTDIR/step.jsonl"

stage vision-attention 30 $PY -c "import torch; from d2v_fast.models.vision import VisionEncoder, attention_backend, vision_config; \
m = VisionEncoder(vision_config('base', 'data2vec')).cuda(); \
print('vision SDPA kernel, v1 relative bias, bf16, with gradient:', attention_backend(m, 'cuda', torch.bfloat16, batch=64)); \
print('vision SDPA kernel, v1 relative bias, bf16, teacher (no gradient):', attention_backend(m, 'cuda', torch.bfloat16, batch=64, backward=False))"
IMG=($PY -m d2v_fast.bench --modality images --config base --data.num_workers 0)
stage step-img-v1 60 "${IMG[@]}" "${TIMED[@]}" --batch-size 64 --providers d2v_fast,reference --json "$OUTDIR/step.jsonl"
stage step-img-v2 60 "${IMG[@]}" "${TIMED[@]}" --recipe data2vec2 --batch-size 16 --providers d2v_fast,reference --json "$OUTDIR/step.jsonl"

stage kernels 90 bash -c "D2V_BENCH_WRITE=1 $PY -m pytest -q -p no:cacheprovider benchmarks/test_kernels.py -k 'not compiled' \
  && cp benchmarks/results/kernels-*h[12]00*.json '$OUTDIR/kernels.json'"

RUN=/tmp/d2v_fast-suite-run
rm -rf "$RUN"
stage pretrain 90 bash -c "$PY -m d2v_fast.pretrain --max-steps 100 --out $RUN --train.progress false \
  && cp $RUN/metrics.jsonl '$OUTDIR/pretrain-metrics.jsonl'"

stage step-d2v-32-all 60 "${BENCH[@]}" "${TIMED[@]}" --batch-size 32 --providers hf,d2v_fast --train.skip_on_device true --train.host_counts true \
  --train.compile blocks --train.fused_qkv true --train.bf16_teacher true --json "$OUTDIR/step.jsonl"
# CUDA graphs of the compiled blocks (--train.compile blocks-cudagraphs): at batch 32 the host's
# launches were slower than the GPU's work (2026-11-28 profile), so this is where it should tell
stage step-d2v-32-graphs 90 "${BENCH[@]}" "${TIMED[@]}" --batch-size 32 --providers d2v_fast --train.skip_on_device true \
  --train.host_counts true --train.compile blocks-cudagraphs --train.fused_qkv true --train.bf16_teacher true \
  --json "$OUTDIR/step.jsonl"
stage step-d2v2-stack 60 "${BENCH[@]}" "${TIMED[@]}" --recipe data2vec2 --batch-size 8 --providers d2v_fast \
  --train.compile stack-cudagraphs --json "$OUTDIR/step.jsonl"
stage step-d2v2-16 40 "${BENCH[@]}" "${TIMED[@]}" --recipe data2vec2 --batch-size 16 --providers d2v_fast,reference --json "$OUTDIR/step.jsonl"

# The SDPA backend pinned (--train.attention): which of cuDNN and memory-efficient attention is faster
# here (text batches carry a padding mask, which SDPA's flash kernel refuses).
stage attention 80 bash -c "for b in cudnn efficient; do ${BENCH[*]} ${TIMED[*]} --batch-size 64 --providers d2v_fast \
  --train.attention \$b --json '$OUTDIR/step.jsonl'; done"

stage step-d2v-32-compile 100 "${BENCH[@]}" "${TIMED[@]}" --batch-size 32 --providers reference+compile --json "$OUTDIR/step.jsonl"

say "done; files: $(ls "$OUTDIR" | tr '\n' ' ')"
