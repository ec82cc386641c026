#!/usr/bin/env bash
# The device check (issue 19 item 6): one command on a GPU host, <= 8 minutes, one markdown table.
#
#   bash bench/device_check.sh [--quick] [--out PATH] [--budget-s S] [--only PARTS]
#
# Measures, on one H100/H200 (Qwen2.5-0.5B shape, random weights, bf16; nothing is downloaded):
#   1   the sampler at the 0.5B preset vs transformers generate (target: >= 200,000 tok/s);
#   2   the long-tail sampler workload, slot refill vs one row per rollout;
#   3   the train step at the preset vs eager and torch.compile'd PyTorch (target: <= 0.118 s/step),
#       and packed vs padded rows per attention backend (cudnn, xla_chunked, xla) x remat (none, full);
#   4   the planner's predicted train-step peak vs JAX's measured peak_bytes_in_use.
# Expected duration: ~8 minutes (the driver stops starting parts at 470 s; per-part estimates in --help).
# The table goes to stdout and to $OUT/device_check.md where $OUT is set, else ./device_check.md
# (device_check.log and device_check.json beside it). Put it in bench/README.md ("Device check").
#
# Before the driver: .whl/*.whl, where present, are installed into /tmp/site (packages the GPU image
# lacks, e.g. grain; nothing can be downloaded there), and PYTHONPATH, XLA_PYTHON_CLIENT_PREALLOCATE=false
# (torch shares the GPU) and PYTHONUNBUFFERED=1 are set. --help prints the driver's full description.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  echo
  exec "$PYTHON" bench/device_check.py --help
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "[device_check.sh] installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into /tmp/site"
  "$PYTHON" -m pip install -q --no-deps --no-index --no-compile --upgrade --target /tmp/site .whl/*.whl
fi

export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1

exec "$PYTHON" bench/device_check.py "$@"
