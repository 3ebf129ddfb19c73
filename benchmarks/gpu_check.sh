#!/usr/bin/env bash
# The GPU check in one command, ≤10 minutes on one H100/H200, one JSON file as output:
#
#     bash benchmarks/gpu_check.sh [--out FILE]      # on a CUDA machine, from the repository root
#     bash benchmarks/gpu_check.sh --dry-run         # here (CPU): the same plumbing at toy sizes
#
# 1. installs the `gpu` extra (flash-attn) unless it imports already — a machine without network
#    keeps going without it (the benchmarks then fall back to SDPA, recorded in the JSON);
# 2. `pytest -m gpu`: flash-attn vs SDPA parity, causal and bidirectional, packed, KV cache;
# 3. the training benchmark (joint step, bf16, flash attention, packed) at d=128 (the reference
#    size) and d=512: particles/s, MFU against the GPU's bf16 peak, peak memory;
# 4. the generation benchmark: jets/s at batch 256 and 1024, length 100, KV cache.
# Each part runs under its own timeout; a part that fails is recorded as failed, the rest still runs.
# --dry-run runs parts 3 and 4 on the CPU at a toy size and only collects the gpu tests.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=benchmarks/results/gpu_check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; OUT=${OUT_OVERRIDE:-/tmp/jetfm_gpu_check_dry.json} ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (expected --dry-run or --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
# the interpreter: $PYTHON, else the repository's .venv (the README's setup), else python on PATH
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
LOG=$(mktemp -d)
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS CMD...: run with a timeout, keep stdout's last line (JSON) and the exit code
  local name=$1 limit=$2; shift 2
  echo "== $name (≤${limit}s): $*" >&2
  timeout "$limit" "$@" >"$LOG/$name.out" 2>"$LOG/$name.err"
  echo $? >"$LOG/$name.rc"
  tail -n 5 "$LOG/$name.err" >&2
}

if [ $DRY = 1 ]; then
  part install 60 "$PY" -c "import torch; print('{\"skipped\": \"dry run\"}')"
  part pytest_gpu 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only
  part train 600 "$PY" benchmarks/train_throughput.py --device cpu --sizes tiny --dtypes bf16 --impls packed,padded \
       --batch-size 8 --iters 1 --warmup 0 --codebook 64 --threads 1
  part generate 300 "$PY" benchmarks/generate_throughput.py --device cpu --batch-sizes 4 --length 6 \
       --modes continuous --iters 1 --ref-iters 1 --warmup 0 --codebook 64 --threads 1
else
  if "$PY" -c "import flash_attn" 2>/dev/null; then
    part install 10 "$PY" -c "print('{\"flash_attn\": \"already installed\"}')"
  else
    part install 240 "$PY" -m pip install -q -e ".[gpu]"
  fi
  part pytest_gpu 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu
  part train 200 "$PY" benchmarks/train_throughput.py --device cuda --sizes ref,d512 --dtypes bf16 --impls packed \
       --attention auto --batch-size 256 --iters 20 --warmup 5
  part generate 120 "$PY" benchmarks/generate_throughput.py --device cuda --batch-sizes 256,1024 --length 100 \
       --modes continuous --iters 3 --ref-iters 0 --warmup 1
fi

"$PY" - "$LOG" "$OUT" "$DRY" <<'PYEOF'
import json, pathlib, sys, time
log, out, dry = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
report = {"check": "gpu_check", "dry_run": dry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": {}}
for name in ("install", "pytest_gpu", "train", "generate"):
    rc = int((log / f"{name}.rc").read_text()) if (log / f"{name}.rc").exists() else None
    stdout = (log / f"{name}.out").read_text() if (log / f"{name}.out").exists() else ""
    entry = {"rc": rc, "ok": rc == 0, "timed_out": rc == 124}
    last = next((l for l in reversed(stdout.splitlines()) if l.startswith("{")), None)
    if last:
        entry["result"] = json.loads(last)
    else:
        entry["tail"] = stdout.splitlines()[-5:] + (log / f"{name}.err").read_text().splitlines()[-10:]
    report["parts"][name] = entry
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1) + "\n")
train = report["parts"]["train"].get("result", {})
for r in train.get("results", []):
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    print(f"train {r['size']:5s} {r['impl']:6s} {r['dtype']} {r['attention']:5s}: {r['particles_per_s']:.0f} particles/s, MFU {mfu}, "
          f"peak {r['peak_mem_mb']:.0f} MB")
for r in report["parts"]["generate"].get("result", {}).get("results", []):
    print(f"generate batch {r['batch']} {'cached' if r['cache'] else 'recompute'}: {r['jets_per_s']:.1f} jets/s")
print(f"parts ok: { {k: v['ok'] for k, v in report['parts'].items()} } -> {out}")
sys.exit(0 if all(v["ok"] for v in report["parts"].values()) else 1)
PYEOF
