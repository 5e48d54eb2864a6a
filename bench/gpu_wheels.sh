#!/usr/bin/env bash
# Fetch, here, the wheels bench/gpu_check.sh installs on the lent GPU machine (Python 3.12, torch 2.11 CUDA 13,
# transformers, accelerate, aiohttp, numpy, pytest, tensorboard, sympy, pyyaml, tqdm, requests; no network at all):
# what gym_plugin and the check import that the machine lacks. Into .gpu_wheels/ (git-ignored; the device tool
# carries it with carry=[".gpu_wheels"]). One version of each package: two would stop the whole install there.
#
#   bench/gpu_wheels.sh            # then, on the device: bench/gpu_check.sh
#
# Pins: the versions the main venv runs the tests with. antlr4-python3-runtime 4.9.3 (hydra-core 1.3 pins 4.9.*;
# latex2sympy2_extended accepts it) exists only as an sdist: it is built into a pure-Python wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PY="${PYTHON:-python3}"
WHEELS=(omegaconf==2.3.1 hydra-core==1.3.8 math-verify==0.9.0 latex2sympy2_extended==1.11.0 gguf==0.19.0)
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${WHEELS[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
# every wheel must be pure Python or built for CPython 3.12 on x86-64 Linux
for whl in "$DEST"/*.whl; do
  case "$(basename "$whl")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-*manylinux*x86_64*.whl) ;;
    *) echo "error: $(basename "$whl") will not install on the device (Python 3.12, x86-64)" >&2; exit 1 ;;
  esac
done
# what travels: the tracked and untracked-not-ignored files plus the carried wheels, 64 MiB at most
tree_kib=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
wheels_kib=$(du -sk "$DEST" | cut -f1)
ls -1 "$DEST"
echo "wheels: $(ls "$DEST" | wc -l) files, ${wheels_kib} KiB; with the tree (${tree_kib} KiB): $(( (tree_kib + wheels_kib) / 1024 )) MiB of the 64 MiB that may travel"
if (( tree_kib + wheels_kib > 48 * 1024 )); then
  echo "error: over 48 MiB: leave room under the 64 MiB limit (untracked files in the tree count too)" >&2
  exit 1
fi
