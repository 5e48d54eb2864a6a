#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what it runs): one command, under nine minutes, on a lent GPU machine.
#
#   here, once:        bench/gpu_wheels.sh                 (fetches .gpu_wheels/, git-ignored)
#   on the device:     bench/gpu_check.sh                  (device tool: carry=[".gpu_wheels"])
#   here, any time:    bench/gpu_check.sh --dry-run        (the CPU, tiny sizes, < 60 s; CI runs it)
#
# On the device it installs the carried wheels without network into /tmp/gym_site (only what the machine lacks:
# omegaconf, hydra-core, antlr4, math-verify, gguf) and imports gym_plugin from this tree (PYTHONPATH), so nothing
# is built or fetched there. Prints one table; writes gpu_check.json and the parts' logs to $OUT (else runs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --dry-run "* ]]; then
  export PYTHONUNBUFFERED=1
  if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gym_site \
      .gpu_wheels/*.whl || { echo "error: installing .gpu_wheels/*.whl failed" >&2; exit 3; }
    export PYTHONPATH="/tmp/gym_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "note: no .gpu_wheels/ here (run bench/gpu_wheels.sh, then carry .gpu_wheels); using what python3 has" >&2
  fi
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv || true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=python3
[[ -n "${VIRTUAL_ENV:-}" ]] && PY=python
exec "$PY" bench/gpu_check.py "$@"
