#!/usr/bin/env bash
# Put the code on every worker of the slice and install it with its `tpu` extra (jax[tpu]).
source "$(dirname "$0")/common.sh"

usage() { cat <<HELP
usage: $SCRIPT --name NAME --zone ZONE [--repo URL [--ref REF]] [--dry-run]

Without --repo: copies this checkout's committed HEAD (git archive) to every worker.
With --repo: every worker clones URL at REF (default main), or updates an existing clone.
Then, on every worker: pip install -e '.[tpu]' and a check that JAX sees the TPU.
  --repo URL        git URL the workers can reach      (ECHORL_REPO)
  --ref REF         branch, tag or commit                (ECHORL_REF, default main)
$COMMON_HELP
HELP
}

REPO=${ECHORL_REPO:-}
REF=${ECHORL_REF:-main}
script_opt() {
  case "$1" in
    --repo) value "$@"; REPO=$2; SHIFT=2 ;;
    --ref) value "$@"; REF=$2; SHIFT=2 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
require_slice
need_gcloud

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "$REPO" ]]; then
  ARCHIVE=/tmp/echorl-jax-src.tar.gz
  run git -C "$ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
  # shellcheck disable=SC2046
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":/tmp/echorl-jax-src.tar.gz $(where) --worker=all
  ssh_all all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/echorl-jax-src.tar.gz -C $REMOTE_DIR"
else
  ssh_all all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch origin && git -C $REMOTE_DIR checkout $REF && git -C $REMOTE_DIR pull --ff-only || true; else git clone $REPO $REMOTE_DIR && git -C $REMOTE_DIR checkout $REF; fi"
fi
ssh_all all "cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'"
ssh_all all "python3 -c 'import jax; print(jax.local_device_count(), jax.local_devices()[0].device_kind)'"
