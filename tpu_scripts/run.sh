#!/usr/bin/env bash
# Launch a training run on every worker, detached (a dropped SSH does not stop it), one log per worker.
source "$(dirname "$0")/common.sh"

usage() { cat <<HELP
usage: $SCRIPT --name NAME --zone ZONE --config FILE [--run RUN] [--dry-run] [-- --config.KEY=VALUE ...]

Starts  python3 -m echorl_jax.main --config FILE OVERRIDES  on all workers at once (JAX finds the other
hosts itself on a TPU VM). Worker output goes to $REMOTE_DIR/logs/RUN-<hostname>.log, the process id to
logs/RUN-<hostname>.pid (stop.sh uses it). Multi-host runs need a train.checkpoint_dir every host sees,
e.g. -- --config.train.checkpoint_dir=gs://BUCKET/RUN/checkpoints. Rerunning the same command resumes.
  --config FILE     config file, relative to the checkout     (ECHORL_CONFIG)
  --run RUN         run name for the log files                 (ECHORL_RUN, default: the config's name)
  -- ARGS           overrides passed on to echorl_jax.main
$COMMON_HELP
HELP
}

CONFIG=${ECHORL_CONFIG:-}
RUN=${ECHORL_RUN:-}
script_opt() {
  case "$1" in
    --config) value "$@"; CONFIG=$2; SHIFT=2 ;;
    --run) value "$@"; RUN=$2; SHIFT=2 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
require_slice
require "$CONFIG" --config ECHORL_CONFIG
RUN=${RUN:-$(basename "$CONFIG" .py)}
need_gcloud

CMD="python3 -m echorl_jax.main --config $(show "$CONFIG")"
[[ ${#ARGS[@]} -gt 0 ]] && CMD+=" $(show "${ARGS[@]}")"
LOG="logs/$RUN-\$(hostname)"
ssh_all all "cd $REMOTE_DIR && mkdir -p logs && setsid nohup $CMD > $LOG.log 2>&1 < /dev/null & echo \$! > $LOG.pid; echo started $RUN on \$(hostname)"
