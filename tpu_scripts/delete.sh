#!/usr/bin/env bash
# Delete the slice (or the queued resource and its slice). Checkpoints on gs:// stay.
source "$(dirname "$0")/common.sh"

usage() { cat <<HELP
usage: $SCRIPT --name NAME --zone ZONE [--queued] [--dry-run]

Deletes the TPU VM slice without asking. Anything on the workers' disks is lost: fetch logs and the
workdir first (logs.sh --fetch); checkpoints under a gs:// train.checkpoint_dir are kept.
  --queued          it was created with create.sh --mode queued/queued-spot: delete the queued
                    resource and its slice                  (TPU_MODE=queued*)
$COMMON_HELP
HELP
}

QUEUED=0
[[ "${TPU_MODE:-}" == queued* ]] && QUEUED=1
script_opt() {
  case "$1" in
    --queued) QUEUED=1; SHIFT=1 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
require_slice
need_gcloud

# shellcheck disable=SC2046
if (( QUEUED )); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" $(where) --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" $(where) --quiet
fi
