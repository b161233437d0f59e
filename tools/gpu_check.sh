#!/usr/bin/env bash
# `make gpu-check` on the GPU machine: installs what the check needs from .gpu-wheels/ (made here by
# `make gpu-wheels`, carried beside the checkout), then runs `python -m prefopt.bench.gpu_check`.
# It uses the machine's own Python, torch and transformers; prefopt runs from the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu-check}"
if [ -d .gpu-wheels ]; then
  # each one alone: a wheel this machine cannot take must not stop the others
  for wheel in .gpu-wheels/*.whl; do
    "$PY" -m pip install -q --no-index --no-deps "$wheel" >/dev/null 2>&1 || echo "gpu-check: could not install $wheel"
  done
  for sdist in .gpu-wheels/deepspeed-*.tar.gz; do  # DeepSpeed ships only as source: built against this torch
    [ -e "$sdist" ] && { "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$sdist" >/dev/null 2>&1 \
      || echo "gpu-check: could not install $sdist"; }
  done
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m prefopt.bench.gpu_check --out "$OUT" "$@"
