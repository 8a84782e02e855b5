#!/usr/bin/env bash
# The first thing to run on a GPU machine: everything only a GPU can show, in one command, under
# 8 minutes on one H100/H200, with no network. Writes JSON + markdown into OUT_DIR:
#
#   env/env.json                 device, versions, measured bf16 / fp16 / fp32 matmul TFLOP/s
#   compile/compile.json         the torch.compile'd loss backend ("compiled") compiled once per dtype,
#                                timed; a dtype that does not compile in its time is left out of the
#                                later steps (which then reuse the compiler's on-disk caches)
#   kernels/kernels_<dtype>.*    every registered loss backend compiled for real, against float64
#                                (bf16, fp16, fp32; odd sizes; loss, both gradients, the temperature
#                                gradient; thresholds that fail the step)
#   loss/contrastive_loss_*.*    the loss sweep: B = 8,192 / 32,768 / 262,144, D = 512, bf16, every
#                                registered backend (triton, chunked, ...), naive, Inf-CL
#   gradcache/bench_gradcache.*  gradient-cached vs plain step at one batch (ViT-B/16 + BERT-base)
#   memory/report.{md,json}      vlscale memory measure --simulate-world-size 8 --memory-cap 32GiB,
#                                zerovl-v100 at global batch 1,048,576 (+ an allocator snapshot)
#   gpu_check.json, gpu_check.md the summary: every step's status, time, and headline numbers
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [--archive FILE.tar.gz] OUT_DIR
#   --dry-run   the same steps on the CPU at toy sizes (Triton in its interpreter): checks the script
#   --archive   also pack OUT_DIR into one tarball (the device tool returns at most 8 files)
# Optional pieces are tolerated and reported as skipped: wheels in .whl/ (or $WHEELS: deepspeed,
# inf-cl, ...) are installed offline into a temporary site folder when present; without inf_cl the
# Inf-CL provider is skipped with a note. Environment: PYTHON (default python3), GPU_CHECK_BUDGET
# (seconds for all steps, default 470).
set -u -o pipefail

DRY=0
ARCHIVE=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --archive) ARCHIVE="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) OUT="$1" ;;
  esac
  shift
done
if [ -z "$OUT" ]; then echo "usage: $0 [--dry-run] [--archive FILE.tar.gz] OUT_DIR" >&2; exit 2; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-470}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

note() { printf '[gpu_check %3ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
# "--exclude compiled" unless the compile step compiled the loss's compiled backend for dtype $1:
# a backend that did not compile within its own limit must not spend another step's time compiling.
exclude_uncompiled() {
  "$PY" -c 'import json, sys
try:
    ok = json.load(open(sys.argv[1]))["dtypes"][sys.argv[2]]["status"] == "ok"
except (OSError, KeyError, ValueError):
    ok = False
print("" if ok else "--exclude compiled")' "$OUT/compile/compile.json" "$1"
}
record() {  # name status seconds note
  "$PY" -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "status": sys.argv[2], "seconds": float(sys.argv[3]), "note": sys.argv[4]}))' \
    "$1" "$2" "$3" "$4" >> "$STEPS"
}
run_step() {  # name limit_seconds command...
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ( $(date +%s) - START ) ))
  if [ "$left" -lt 20 ]; then
    note "$name: skipped (time budget of ${BUDGET}s spent)"; record "$name" skipped 0 "time budget spent"; return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  note "$name (limit ${limit}s): $*"
  local t0=$(date +%s.%N) rc status
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  local secs; secs=$("$PY" -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0")
  note "$name: $status after ${secs}s (log: logs/$name.log)"
  record "$name" "$status" "$secs" "exit status $rc; last line: $(tail -n 1 "$OUT/logs/$name.log" | tr -d '"\\' | cut -c1-200)"
}

# -- a plain checkout: make `import vlscale` (and vlscale.kernels, mapped from kernels/) work ------
if ! "$PY" -c "import vlscale.kernels" 2>/dev/null; then
  mkdir -p "$WORK/site"
  cat > "$WORK/site/sitecustomize.py" <<EOF
import importlib.abc, importlib.util, sys
sys.path.insert(0, "$ROOT")
class _Kernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "vlscale.kernels":
            return importlib.util.spec_from_file_location(
                name, "$ROOT/kernels/__init__.py", submodule_search_locations=["$ROOT/kernels"])
        return None
sys.meta_path.insert(0, _Kernels())
EOF
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# -- carried wheels (deepspeed, inf-cl, ...), installed offline when present -----------------------
WHEELS="${WHEELS:-$ROOT/.whl}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/wheels" "$WHEELS"/*.whl \
      > "$OUT/logs/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH${PYTHONPATH:+:}$WORK/wheels"
    note "installed carried wheels: $(ls "$WHEELS" | tr '\n' ' ')"
  else
    note "carried wheels could not be installed (see logs/wheels.log): going on without them"
  fi
fi
"$PY" -c "import inf_cl" 2>/dev/null && INFCL="inf_cl $("$PY" -c 'import inf_cl; print(getattr(inf_cl, "__version__", "?"))' 2>/dev/null)" \
  || INFCL="absent (the Inf-CL provider is skipped with a note)"
note "inf_cl: $INFCL"

B="benchmarks"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
  note "dry run: CPU, toy sizes, Triton in its interpreter"
  run_step env 120 "$PY" "$B/harness.py" env --out "$OUT/env" --device cpu
  run_step compile 240 "$PY" "$B/bench_contrastive_loss.py" --device cpu --warm-compile fp32 --out "$OUT/compile"
  # The plumbing, not every backend (the compiled one was timed by the compile step).
  run_step kernels 240 "$PY" "$B/bench_contrastive_loss.py" --device cpu --dtype fp32 --sizes 7,33 --dims 32 \
    --providers naive,chunked,triton,reference --check-only --stem kernels_fp32 --out "$OUT/kernels"
  run_step loss 240 "$PY" "$B/bench_contrastive_loss.py" --device cpu --dtype fp32 --sizes 48 --dims 256 \
    --providers naive,chunked,triton,infcl --reps 1 --memory off --check-max 100000 --out "$OUT/loss"
  run_step gradcache 240 "$PY" "$B/bench_gradcache.py" --smoke --out "$OUT/gradcache/bench_gradcache.jsonl"
  run_step memory 300 "$PY" "$B/harness.py" vlscale memory measure --recipe tiny-cpu train.global_batch_size=64 \
    gradcache.chunk_size=8 --simulate-world-size 4 --memory-cap 1GiB --backend tensors --out "$OUT/memory"
else
  # Most telling first: when the time budget runs out, the later steps are skipped (and say so).
  kernels() {
    run_step "kernels_$1" 75 "$PY" "$B/bench_contrastive_loss.py" --dtype "$1" --sizes 7,127,1000,4097 \
      --dims 64,512,768 --check-only --stem "kernels_$1" --out "$OUT/kernels" $(exclude_uncompiled "$1")
  }
  run_step env 60 "$PY" "$B/harness.py" env --out "$OUT/env"
  # torch.compile of the compiled backend (the V100 path) for every dtype, once, in its own limit:
  # ~20-60 s cold per dtype; the kernels and loss steps then hit the caches (or leave it out).
  run_step compile 150 "$PY" "$B/bench_contrastive_loss.py" --warm-compile bf16,fp16,fp32 --out "$OUT/compile"
  kernels bf16
  run_step loss 180 "$PY" "$B/bench_contrastive_loss.py" --dtype bf16 --sizes 8192,32768,262144 --dims 512 \
    --reps 3 --check-max 8192 --out "$OUT/loss" $(exclude_uncompiled bf16)
  run_step memory 200 "$PY" "$B/harness.py" vlscale memory measure --recipe zerovl-v100 \
    train.global_batch_size=1048576 --simulate-world-size 8 --memory-cap 32GiB --out "$OUT/memory"
  run_step gradcache 90 "$PY" "$B/bench_gradcache.py" --sizes 512 --chunk 256 --reps 3 \
    --out "$OUT/gradcache/bench_gradcache.jsonl"
  kernels fp16
  kernels fp32
fi

"$PY" "$B/gpu_check_report.py" "$OUT" --budget "$BUDGET" --elapsed "$(( $(date +%s) - START ))" \
  --note "inf_cl: $INFCL" $([ "$DRY" = 1 ] && echo --dry-run)
rc=$?
if [ -n "$ARCHIVE" ]; then
  # Leave out files over 15 MiB (e.g. a large allocator snapshot): the device tool returns 16 MiB per file.
  (cd "$(dirname "$OUT")" && find "$(basename "$OUT")" -type f -size -15M -print0 \
    | tar --null -czf "$ARCHIVE" -T -) && note "archive: $ARCHIVE"
fi
exit $rc
