# Shared by the tpu_scripts: settings from flags or env, --help, --dry-run, and clear errors.
# Every setting has a flag and an env var (flags win): --name TPU_NAME, --zone TPU_ZONE, --project TPU_PROJECT.
set -euo pipefail

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_PROJECT=${TPU_PROJECT:-}            # optional: gcloud's default project when empty
REMOTE_DIR=${ECHORL_REMOTE_DIR:-'~/echorl-jax'}  # the checkout on every worker (~ expands there)
DRY_RUN=0
SCRIPT=$(basename "$0")

die() { echo "$SCRIPT: error: $*" >&2; exit 2; }

# require VALUE FLAG ENV: a required setting must not be empty.
require() { [[ -n "$1" ]] || die "$2 is not set: pass $2 or set $3"; }

# Prints a command line, quoting only the arguments that need it.
show() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# run CMD...: prints it with --dry-run, runs it otherwise (and echoes it to stderr first).
run() {
  if (( DRY_RUN )); then show "$@"; else echo "+ $(show "$@")" >&2; "$@"; fi
}

# gcloud must exist unless we only print the commands.
need_gcloud() {
  (( DRY_RUN )) && return 0
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or use --dry-run to print the commands"
}

# The flags every gcloud tpu-vm command takes.
where() {
  local w=(--zone="$TPU_ZONE")
  [[ -n "$TPU_PROJECT" ]] && w+=(--project="$TPU_PROJECT")
  echo "${w[@]}"
}

# ssh_all WORKER COMMAND: run a shell command on one worker (0, 1, ...) or on every worker (all).
ssh_all() {
  # shellcheck disable=SC2046
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" $(where) --worker="$1" --command="$2"
}

# parse_args "$@": common options here; a script's own ones through its `script_opt` function, which
# sets SHIFT (args consumed) and returns 0 when it knows the option. --opt=value equals --opt value.
ARGS=()
parse_args() {
  local expanded=() a rest=0
  for a in "$@"; do  # up to "--": the rest goes to the trainer as it is
    [[ "$a" == -- ]] && rest=1
    if (( !rest )) && [[ "$a" == --*=* ]]; then expanded+=("${a%%=*}" "${a#*=}"); else expanded+=("$a"); fi
  done
  set -- ${expanded[@]+"${expanded[@]}"}
  while (( $# )); do
    SHIFT=0
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; SHIFT=1 ;;
      --name) value "$@"; TPU_NAME=$2; SHIFT=2 ;;
      --zone) value "$@"; TPU_ZONE=$2; SHIFT=2 ;;
      --project) value "$@"; TPU_PROJECT=$2; SHIFT=2 ;;
      --) shift; ARGS+=("$@"); break ;;
      *) if declare -F script_opt >/dev/null && script_opt "$@"; then :; else
           die "unknown option '$1' (see $SCRIPT --help)"; fi ;;
    esac
    shift "$SHIFT"
  done
}

# value "$@": the option in $1 needs a value in $2.
value() { [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value"; }

# The settings every script needs.
require_slice() {
  require "$TPU_NAME" --name TPU_NAME
  require "$TPU_ZONE" --zone TPU_ZONE
}

COMMON_HELP="Common options (flag or env var; flags win):
  --name NAME       TPU VM / queued resource name        (TPU_NAME)
  --zone ZONE       e.g. us-central2-b                    (TPU_ZONE)
  --project ID      GCP project; default: gcloud's        (TPU_PROJECT)
  --dry-run         print the gcloud commands, run nothing (gcloud need not be installed)
  -h, --help        this help
The checkout on the workers is \$ECHORL_REMOTE_DIR (default ~/echorl-jax)."
