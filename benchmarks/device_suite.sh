#!/usr/bin/env bash
# The speed measurements for a lent GPU (MLX's CUDA backend), in one run of under 10 minutes:
#
#   bash benchmarks/device_suite.sh            # on the GPU machine, from the repository root
#   QUICK=1 bash benchmarks/device_suite.sh    # plumbing check anywhere (tiny sizes, any backend)
#
# Steps: install (pip install -e ".[cuda,peers]" unless gemma_mlx, mlx and the peers import
# already), environment, build the random Gemma-4-shaped 4-bit model and drafter
# (benchmarks/gemma4_shaped.py), `gemma-mlx bench --json` on the 270M default and on the
# Gemma-4-shaped model (plain and with the drafter), the peer comparison
# (benchmarks/compare_peers.py), the verify cost (benchmarks/verify_cost.py) and batched decode
# steps against mlx-lm's (benchmarks/batch_decode.py). Each step has its
# own time limit; a failing step is recorded (exit status, seconds, log tail) and the suite goes
# on. Everything lands in $OUT/benchmarks/results/device/ when $OUT is set (the device tool
# returns files from $OUT), else in benchmarks/results/device/; suite.json sums it up.
#
# Environment: PYTHON (default python3), QUICK=1, SKIP_INSTALL=1, GEMMA3_MODEL (a Gemma 3 checkpoint
# instead of the offline 270M, which needs the `demo` extra's package), G4_LAYERS, G4_VOCAB,
# LIMIT_SCALE (multiplies every step's time limit and the budget; QUICK: default 4), SUITE_BUDGET
# (seconds for all steps, default 570; a step gets at most what is left).
set -euo pipefail

PY=${PYTHON:-python3}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then SCALE=${LIMIT_SCALE:-4}; else SCALE=${LIMIT_SCALE:-1}; fi
BUDGET=$((${SUITE_BUDGET:-570} * SCALE)) # seconds for all steps: the device tool allows 600 a command
START=$(date +%s)
RESULTS=${OUT:+$OUT/benchmarks/results/device}
RESULTS=${RESULTS:-benchmarks/results/device}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gemma-mlx-suite.XXXXXX")
mkdir -p "$RESULTS"
: >"$RESULTS/steps.tsv"
trap 'rm -rf "$WORK"' EXIT

if [ "$QUICK" = 1 ]; then
  G4=(--layers 2 --vocab 2048 --hidden 256)
  BENCH=(-p 16 -g 4 -n 1 -d 0,32)
  PEERS=(--rounds 1 --prompt-tokens 8 --generation-tokens 4 --g4-prompt-tokens 8
    --g4-generation-tokens 4 --g4-layers 2 --g4-vocab 2048 --g4-hidden 256)
  VERIFY=(--depths 0 --sizes 1,2 --passes 1)
  BATCH=(--tiny --rows 1,2 --tokens 4)
else
  G4=(--layers "${G4_LAYERS:-6}" --vocab "${G4_VOCAB:-262144}")
  BENCH=(-p 128,512,2048 -g 64 -n 3 -d 0,1024,4096)
  PEERS=(--rounds 5 --prompt-tokens 512 --generation-tokens 64 --g4-prompt-tokens 512
    --g4-generation-tokens 64 --g4-layers "${G4_LAYERS:-6}" --g4-vocab "${G4_VOCAB:-262144}")
  VERIFY=(--depths 0,1024,4096 --sizes 1,2,4,8 --passes 5)
  BATCH=(--rows 1,2,4,8 --tokens 32 --peer)
fi

# step NAME SECONDS CMD...: run CMD with a time limit, its output in NAME.log; never stops the suite
step() {
  local name=$1 limit=$(($2 * SCALE)) start rc left
  shift 2
  start=$(date +%s)
  left=$((BUDGET - (start - START)))
  if [ "$left" -lt 5 ]; then
    printf '%s\tout-of-budget\t0\n' "$name" >>"$RESULTS/steps.tsv"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s)" >&2
  set +e
  timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  rc=$?
  set -e
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$RESULTS/steps.tsv"
  [ "$rc" = 0 ] || echo "   failed (exit $rc): see $RESULTS/$name.log" >&2
  return 0
}

# stdout of a step into FILE too (the JSON reports), keeping its log
json_step() {
  local name=$1 limit=$2 file=$3
  shift 3
  step "$name" "$limit" "$@"
  # the report is the last line of the log that parses as a JSON object
  "$PY" - "$RESULTS/$name.log" "$RESULTS/$file" <<'EOF' || true
import json, sys
for line in reversed(open(sys.argv[1], errors="replace").read().splitlines()):
    if line.startswith("{"):
        try:
            json.loads(line)
        except ValueError:
            continue
        open(sys.argv[2], "w").write(line + "\n")
        break
EOF
}

ready() { "$PY" -c "import mlx.core, gemma_mlx.cli, mlx_lm, mlx_vlm" >/dev/null 2>&1; }

if [ "${SKIP_INSTALL:-0}" = 1 ] || ready; then
  printf 'install\tskipped\t0\n' >>"$RESULTS/steps.tsv"
else
  # offline machines: fall back to installing only this project against what is there
  step install 120 bash -c "$PY -m pip install -e '.[cuda,peers]' || $PY -m pip install --no-deps --no-build-isolation -e ."
fi

json_step environment 60 environment.json "$PY" -c '
import json, os, platform, subprocess
import mlx.core as mx
info = {"mlx": mx.__version__, "device": str(mx.default_device()), "platform": platform.platform(),
        "cpus": os.cpu_count(), "load": os.getloadavg()}
try:
    info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
    info["gpu"] = f"nvidia-smi: {e}"
for name in ("mlx_lm", "mlx_vlm"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
print(json.dumps(info))'

step build_gemma4_shaped 90 "$PY" benchmarks/gemma4_shaped.py "$WORK/g4" --drafter "${G4[@]}"

if [ -n "${GEMMA3_MODEL:-}" ]; then
  M270=$GEMMA3_MODEL
else
  M270=$("$PY" -c "from gemma_mlx.convert.default_model import default_model_path; print(default_model_path())" \
    2>"$RESULTS/default_model.log" | tail -1) || M270=""
fi
if [ -n "$M270" ]; then
  json_step bench_270m 60 bench_270m.json "$PY" -m gemma_mlx.cli bench --model "$M270" "${BENCH[@]}" --json
else
  printf 'bench_270m\tno-model\t0\n' >>"$RESULTS/steps.tsv"
fi
json_step bench_gemma4_shaped 60 bench_gemma4_shaped.json \
  "$PY" -m gemma_mlx.cli bench --model "$WORK/g4/target" "${BENCH[@]}" --json
json_step bench_gemma4_shaped_mtp 60 bench_gemma4_shaped_mtp.json \
  "$PY" -m gemma_mlx.cli bench --model "$WORK/g4/target" --draft "$WORK/g4/drafter" "${BENCH[@]}" --json
step compare_peers 180 "$PY" benchmarks/compare_peers.py ${M270:+--model "$M270"} --g4-dir "$WORK/g4" "${PEERS[@]}" \
  --out "$RESULTS/peers"
step verify_cost 45 "$PY" benchmarks/verify_cost.py --model "$WORK/g4/target" "${VERIFY[@]}"
# decode steps of 1-8 rows in one batch (issue 23), against mlx-lm's BatchGenerator on the 270M
if [ "$QUICK" = 1 ]; then
  step batch_decode 60 "$PY" benchmarks/batch_decode.py "${BATCH[@]}" --out "$RESULTS/batch_decode.json"
elif [ -n "$M270" ]; then
  step batch_decode 60 "$PY" benchmarks/batch_decode.py "${BATCH[@]}" --model "$M270" --out "$RESULTS/batch_decode.json"
fi

"$PY" - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
steps = []
for line in (results / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    log = results / f"{name}.log"
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
    steps.append({"step": name, "status": rc, "ok": rc in ("0", "skipped"), "seconds": int(seconds),
                  **({} if rc in ("0", "skipped") else {"log_tail": tail})})
reports = {}
for p in sorted(results.glob("*.json")):
    if p.name != "suite.json":
        try:
            reports[p.stem] = json.loads(p.read_text())
        except ValueError as e:
            reports[p.stem] = {"error": f"not JSON: {e}"}
(results / "suite.json").write_text(json.dumps({"steps": steps, "reports": reports}, indent=1))
print(json.dumps([(s["step"], s["status"], s["seconds"]) for s in steps]))
EOF
