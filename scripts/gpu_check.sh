#!/usr/bin/env bash
# One command for a fresh GPU machine (docs/gpu.md): installs what is missing, prints the torch and CUDA
# versions, runs `moshi-ttt bench --sections gpu` (the check under CUDA graphs first, then the bench) and
# writes docs/bench_gpu.json plus docs/bench_gpu.log. Quick sizes unless --full.
#
#   scripts/gpu_check.sh [--dry-run] [--full] [--out FILE.json]
#     --dry-run  print each step it would take (probes for what is installed still run; nothing is changed)
#     --full     the full sweep (more batch sizes, steps and rounds) instead of the quick one
#     --out      the JSON to write (default docs/bench_gpu.json); the log goes next to it (.log)
#   PYTHON=/path/to/python picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0 QUICK=--quick OUT=docs/bench_gpu.json
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --full) QUICK="" ;;
    --out) OUT="${2:?--out needs a file}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
LOG="${OUT%.json}.log"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# torch.compile off for both models alike (the TTT layers' MLP is not a moshi compiled kernel); CUDA graphs
# stay as moshi sets them. Random weights: nothing is downloaded.
export NO_TORCH_COMPILE=1 HF_HUB_OFFLINE=1
MOSHI=moshi==0.2.13

step() {  # step DESCRIPTION CMD...: print the step, run it unless --dry-run
  echo "+ $1"
  shift
  if [ "$DRY" = 0 ]; then "$@"; fi
}
has() {  # has MODULE: installed? (found, not imported: no torch start-up per probe)
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null
}

torch_past_moshi_pin() {  # moshi 0.2.13 pins torch < 2.10; true when this machine's torch is newer (or absent:
  # pip would install the newest)
  has torch || return 0
  "$PY" -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
sys.exit(0 if v >= (2, 10) else 1)"
}

moshi_deps_but_torch() {  # moshi's own requirements (from its installed metadata) except torch
  "$PY" -c "from importlib.metadata import requires; \
print('\n'.join(r for r in requires('moshi') if 'extra ==' not in r and not r.startswith('torch')))" \
    | tr '\n' '\0' | xargs -0 "$PY" -m pip install
}

project_deps_but_moshi() {  # pyproject.toml's [project] dependencies except moshi (installed above)
  "$PY" - <<'EOF' | tr '\n' '\0' | xargs -0 "$PY" -m pip install
import re
text = open("pyproject.toml").read()
block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
print("\n".join(d for d in re.findall(r'"([^"]+)"', block) if not d.startswith("moshi")))
EOF
}

versions() {
  "$PY" -c "import torch; ok = torch.cuda.is_available(); \
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version(), \
'| GPU', torch.cuda.get_device_name(0) if ok else 'none visible')" | tee "$LOG"
}

bench_to_json() {
  if "$PY" -m moshi_ttt bench --sections gpu --json $QUICK >"$OUT.partial" 2> >(tee -a "$LOG" >&2); then
    mv "$OUT.partial" "$OUT"
  else
    rc=$?
    rm -f "$OUT.partial"
    echo "gpu_check.sh: the check or the bench failed (exit $rc); see $LOG" >&2
    return "$rc"
  fi
}

[ "$DRY" = 1 ] || mkdir -p "$(dirname "$OUT")"
echo "gpu_check.sh: python $PY, output $OUT, log $LOG, sizes ${QUICK:---full}$([ "$DRY" = 1 ] && echo ', dry run')"
# 1. torch: keep the machine's own (any recent version); only a machine without one gets PyPI's.
has torch || step "$PY -m pip install torch" "$PY" -m pip install torch
# 2. moshi: with a torch newer than its pin, without its deps (then its other deps), so pip leaves torch alone.
if ! has moshi; then
  if torch_past_moshi_pin; then
    step "$PY -m pip install --no-deps $MOSHI" "$PY" -m pip install --no-deps "$MOSHI"
    step "$PY -m pip install <moshi's requirements except torch, from its metadata>" moshi_deps_but_torch
  else
    step "$PY -m pip install $MOSHI" "$PY" -m pip install "$MOSHI"
  fi
fi
# 3. moshi-ttt itself, editable, without deps (they would re-pin moshi's torch), then its other deps.
if ! has moshi_ttt.server; then
  step "$PY -m pip install --no-deps -e ." "$PY" -m pip install --no-deps -e .
  step "$PY -m pip install <pyproject.toml dependencies except moshi>" project_deps_but_moshi
fi
# 4. what it runs with (first lines of the log)
step "$PY -c 'import torch; print(torch.__version__, torch.version.cuda, the GPU)'  (> $LOG)" versions
# 5. the check under CUDA graphs, then the bench: one JSON object on stdout, progress on stderr
step "$PY -m moshi_ttt bench --sections gpu --json $QUICK > $OUT  (stderr >> $LOG)" bench_to_json
[ "$DRY" = 1 ] || echo "gpu_check.sh: wrote $OUT and $LOG in ${SECONDS} s"
