#!/usr/bin/env bash
# Stop a run on every worker with SIGTERM: the trainer saves one coordinated checkpoint and exits.
source "$(dirname "$0")/common.sh"

usage() { cat <<HELP
usage: $SCRIPT --name NAME --zone ZONE --run RUN [--kill] [--dry-run]

Sends SIGTERM to the run's process on every worker (its pid file from run.sh). The hosts agree at the
end of the current step, save that step and exit; run.sh with the same settings resumes from it.
  --run RUN         the run name given to run.sh          (ECHORL_RUN)
  --kill            SIGKILL instead: no checkpoint (a run that is stuck)
$COMMON_HELP
HELP
}

RUN=${ECHORL_RUN:-}
SIGNAL=TERM
script_opt() {
  case "$1" in
    --run) value "$@"; RUN=$2; SHIFT=2 ;;
    --kill) SIGNAL=KILL; SHIFT=1 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
require_slice
require "$RUN" --run ECHORL_RUN
need_gcloud

ssh_all all "kill -$SIGNAL \$(cat $REMOTE_DIR/logs/$RUN-\$(hostname).pid) && echo sent SIG$SIGNAL on \$(hostname) || echo no running $RUN on \$(hostname)"
