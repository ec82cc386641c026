#!/usr/bin/env bash
# Watch a run's log (tail) or copy every worker's logs and the run's workdir to this machine (fetch).
source "$(dirname "$0")/common.sh"

usage() { cat <<HELP
usage: $SCRIPT --name NAME --zone ZONE --run RUN [--worker N] [--lines N] [--no-follow] [--dry-run]
       $SCRIPT --name NAME --zone ZONE --run RUN --fetch DIR [--workdir PATH] [--dry-run]

Tail (default): follows worker N's log (default 0: process 0 prints the metrics).
Fetch: copies logs/RUN-*.log from every worker into DIR, and with --workdir the run's workdir
(metrics.jsonl, report.md, tensorboard/; written by process 0) from worker 0.
  --run RUN         the run name given to run.sh          (ECHORL_RUN)
  --worker N        worker to tail (0, 1, ...)
  --lines N         lines of history to show (default 100)
  --no-follow       print and exit instead of following
  --fetch DIR       local directory to copy into
  --workdir PATH    train.workdir, relative to the checkout (e.g. runs/tiny_test)
$COMMON_HELP
HELP
}

RUN=${ECHORL_RUN:-}
WORKER=0 LINES=100 FOLLOW=-f FETCH="" WORKDIR=""
script_opt() {
  case "$1" in
    --run) value "$@"; RUN=$2; SHIFT=2 ;;
    --worker) value "$@"; WORKER=$2; SHIFT=2 ;;
    --lines) value "$@"; LINES=$2; SHIFT=2 ;;
    --no-follow) FOLLOW=""; SHIFT=1 ;;
    --fetch) value "$@"; FETCH=$2; SHIFT=2 ;;
    --workdir) value "$@"; WORKDIR=$2; SHIFT=2 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
require_slice
require "$RUN" --run ECHORL_RUN
need_gcloud

if [[ -z "$FETCH" ]]; then
  ssh_all "$WORKER" "tail -n $LINES $FOLLOW $REMOTE_DIR/logs/$RUN-*.log"
else
  run mkdir -p "$FETCH"
  # shellcheck disable=SC2046
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:$REMOTE_DIR/logs/$RUN-*.log" "$FETCH/" $(where) --worker=all
  if [[ -n "$WORKDIR" ]]; then
    # shellcheck disable=SC2046
    run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$REMOTE_DIR/$WORKDIR" "$FETCH/" $(where) --worker=0
  fi
fi
