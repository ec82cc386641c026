#!/usr/bin/env bash
# Create a Cloud TPU VM slice: on-demand, spot, or through a queued resource (waits in line for capacity).
source "$(dirname "$0")/common.sh"

usage() { cat <<HELP
usage: $SCRIPT --name NAME --zone ZONE --type TYPE [--mode MODE] [--runtime VERSION] [--dry-run]

Creates the slice. The quota for TYPE (on-demand or preemptible/spot chips) must exist in ZONE.
  --type TYPE       accelerator type, e.g. v4-32, v5litepod-16, v5p-64, v6e-8   (TPU_TYPE)
  --mode MODE       on-demand | spot | queued | queued-spot   (TPU_MODE, default on-demand)
                    queued*: a queued resource, created when capacity frees up; watch it with
                    gcloud compute tpus queued-resources describe NAME --zone ZONE
  --runtime VER     TPU software version (TPU_RUNTIME); default from TYPE:
                    v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
$COMMON_HELP
HELP
}

TPU_TYPE=${TPU_TYPE:-}
TPU_MODE=${TPU_MODE:-on-demand}
TPU_RUNTIME=${TPU_RUNTIME:-}
script_opt() {
  case "$1" in
    --type) value "$@"; TPU_TYPE=$2; SHIFT=2 ;;
    --mode) value "$@"; TPU_MODE=$2; SHIFT=2 ;;
    --runtime) value "$@"; TPU_RUNTIME=$2; SHIFT=2 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
require_slice
require "$TPU_TYPE" --type TPU_TYPE
if [[ -z "$TPU_RUNTIME" ]]; then
  case "$TPU_TYPE" in
    v4-*) TPU_RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) TPU_RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) TPU_RUNTIME=v2-alpha-tpuv6e ;;
    *) die "--runtime is not set and there is no default for --type $TPU_TYPE: pass --runtime or set TPU_RUNTIME" ;;
  esac
fi
need_gcloud

# shellcheck disable=SC2046
case "$TPU_MODE" in
  on-demand) run gcloud compute tpus tpu-vm create "$TPU_NAME" $(where) --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME" ;;
  spot) run gcloud compute tpus tpu-vm create "$TPU_NAME" $(where) --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME" --spot ;;
  queued) run gcloud compute tpus queued-resources create "$TPU_NAME" $(where) --node-id="$TPU_NAME" --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME" ;;
  queued-spot) run gcloud compute tpus queued-resources create "$TPU_NAME" $(where) --node-id="$TPU_NAME" --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME" --spot ;;
  *) die "--mode (or TPU_MODE) is '$TPU_MODE': use on-demand, spot, queued or queued-spot" ;;
esac
