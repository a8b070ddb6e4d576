#!/usr/bin/env bash
# Cloud TPU VM launcher for elf_jax: create a TPU VM slice, install the code on every worker, run training on all
# workers at once, follow the logs, delete the slice. Every remote action is one gcloud command; --dry-run prints
# them instead of running them. See launch/README.md.
set -euo pipefail

readonly REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly VENV='$HOME/elf_venv'      # expanded on the workers
readonly RUN_LOG='$HOME/elf_run.log'

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [options] [-- MAIN_ARGS...]

Commands:
  create   request the TPU VM slice (queued resource by default) and wait until it is ready
  setup    put the code on every worker (copy of this working tree, or --repo clone) and pip install -e ".[tpu]"
  run      run `python -m elf_jax.main --config=... --workdir=...` on all workers with ELF_DISTRIBUTED=1
  logs     follow the run log of one worker (--worker, default 0)
  delete   delete the slice
  all      create -> setup -> run -> delete (the slice is deleted even if setup or run fails)

Options:
  --name NAME              TPU VM / queued-resource name (default: elf-$USER)
  --zone ZONE              zone (default: gcloud's compute/zone), e.g. us-east5-a for v5p
  --project PROJECT        project (default: gcloud's core/project)
  --accelerator-type TYPE  default v5p-64 (32 chips, 8 hosts)
  --runtime-version VER    TPU software version (default v2-alpha-tpuv5, the v5p runtime)
  --spot | --reserved      spot capacity, or capacity from the project's reservation
  --no-queue               create/delete with `tpu-vm create/delete` instead of a queued resource
  --poll-seconds N         create: seconds between state checks of the queued resource (default 30)
  --repo URL               setup: git clone URL on the workers instead of copying this working tree
  --branch REF             setup with --repo: the branch/tag to check out (default: the remote's HEAD)
  --python PY              setup: worker interpreter for the venv, >= 3.11 (default python3.11, apt-installed
                           if missing)
  --config PATH            run: config file, relative to the repo root (e.g. configs/owt_b.py)
  --workdir DIR            run: output directory, the same on all workers; use gs://... on multi-host slices
  --config.KEY=VALUE       run: config override, passed to main (as is everything after --)
  --detach                 run: start in the background (survives a dropped ssh); follow with `logs`
  --worker N               logs: which worker's log to follow (default 0)
  --dry-run                print every command instead of running it
  -h, --help               this help

Example:
  launch/tpu_vm.sh all --zone=us-east5-a --name=elf-b --config=configs/owt_b.py --workdir=gs://bucket/elf-b \
      -- --config.optim.num_steps=1000
EOF
}

die() {
  echo "tpu_vm.sh: $*" >&2
  echo "Run 'launch/tpu_vm.sh --help' for usage." >&2
  exit 2
}

# Prints one argument quoted for a POSIX shell (bare when that is safe).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out=() arg
  for arg in "$@"; do out+=("$(quote "$arg")"); done
  printf '%s' "${out[*]}"
}

# Runs a command, or prints it with --dry-run.
do_cmd() {
  if (( DRY_RUN )); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

gcloud_tpu() {  # gcloud compute tpus SUBGROUP VERB ... plus --zone/--project when given
  local args=(gcloud compute tpus "$@")
  [[ -n "$ZONE" ]] && args+=("--zone=$ZONE")
  [[ -n "$PROJECT" ]] && args+=("--project=$PROJECT")
  do_cmd "${args[@]}"
}

ssh_all() {  # runs one shell command line on every worker
  gcloud_tpu tpu-vm ssh "$NAME" --worker=all "--command=$1"
}

cmd_create() {
  local capacity=()
  [[ -n "$CAPACITY" ]] && capacity=("--$CAPACITY")
  if (( NO_QUEUE )); then
    gcloud_tpu tpu-vm create "$NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
      "${capacity[@]}"
    return
  fi
  gcloud_tpu queued-resources create "$NAME" "--node-id=$NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--runtime-version=$RUNTIME_VERSION" "${capacity[@]}"
  if (( DRY_RUN )); then
    echo "# then poll until the state is ACTIVE:" >&2
    gcloud_tpu queued-resources describe "$NAME" '--format=value(state.state)'
    return
  fi
  local state
  while true; do
    state="$(gcloud_tpu queued-resources describe "$NAME" '--format=value(state.state)')"
    case "$state" in
      ACTIVE) echo "tpu_vm.sh: $NAME is ACTIVE" >&2; return ;;
      FAILED | SUSPENDING | SUSPENDED)
        echo "tpu_vm.sh: queued resource $NAME is $state; see" \
          "'gcloud compute tpus queued-resources describe $NAME', then delete it" >&2
        exit 1 ;;
      *) echo "tpu_vm.sh: $NAME is ${state:-not visible yet}; waiting ${POLL_SECONDS}s" >&2
         sleep "$POLL_SECONDS" ;;
    esac
  done
}

pack_tree() {  # packs this working tree (tracked + untracked, not git-ignored files) into $1
  if (( DRY_RUN )); then
    echo "# pack the working tree of $REPO_ROOT (git ls-files, no ignored files) into $1" >&2
    return
  fi
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done |
    tar --null -T - -czf "$1")
}

cmd_setup() {
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    fetch="{ [ -d elf_jax/.git ] || git clone $(quote "$REPO_URL") elf_jax; } && git -C elf_jax fetch origin"
    fetch+=" && git -C elf_jax checkout -f --detach $(quote "origin/${BRANCH:-HEAD}")"
  else
    local tmp
    tmp="$(mktemp -d)"
    pack_tree "$tmp/elf_jax.tar.gz"
    gcloud_tpu tpu-vm scp "$tmp/elf_jax.tar.gz" "$NAME:elf_jax.tar.gz" --worker=all
    rm -rf "$tmp"
    fetch="mkdir -p elf_jax && tar -xzf elf_jax.tar.gz -C elf_jax"
  fi
  local py
  py="$(quote "$PYTHON")"
  ssh_all "set -e; $fetch
command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $py $py-venv; }
[ -x $VENV/bin/python ] || $py -m venv $VENV
$VENV/bin/pip install -q -U pip
cd elf_jax && $VENV/bin/pip install -e \".[tpu]\""
}

cmd_run() {
  [[ -n "$CONFIG" ]] || die "run needs --config=PATH (e.g. --config=configs/owt_b.py)"
  [[ -n "$WORKDIR" ]] || die "run needs --workdir=DIR (gs://bucket/path on multi-host slices)"
  [[ "$WORKDIR" == gs://* ]] || echo "tpu_vm.sh: warning: --workdir=$WORKDIR is not gs://...; on a multi-host" \
    "slice every worker writes its own local copy and checkpoints need one shared directory" >&2
  local main
  main="ELF_DISTRIBUTED=1 $VENV/bin/python -m elf_jax.main $(quote_all "--config=$CONFIG" "--workdir=$WORKDIR" \
    "${MAIN_ARGS[@]}")"
  if (( DETACH )); then
    ssh_all "cd elf_jax && { nohup env $main >>$RUN_LOG 2>&1 </dev/null & }"
    echo "tpu_vm.sh: started in the background; follow with: launch/tpu_vm.sh logs --name=$NAME" >&2
  else
    ssh_all "set -o pipefail; cd elf_jax && env $main 2>&1 | tee -a $RUN_LOG"
  fi
}

cmd_logs() {
  gcloud_tpu tpu-vm ssh "$NAME" "--worker=$WORKER" "--command=tail -n 200 -F $RUN_LOG"
}

cmd_delete() {
  if (( NO_QUEUE )); then
    gcloud_tpu tpu-vm delete "$NAME" --quiet
  else
    gcloud_tpu queued-resources delete "$NAME" --force --quiet
  fi
}

cmd_all() {
  (( DETACH )) && die "all deletes the slice when the run ends; --detach would delete it under a running job"
  [[ -n "$CONFIG" && -n "$WORKDIR" ]] || die "all needs --config=PATH and --workdir=DIR"
  cmd_create
  trap cmd_delete EXIT
  cmd_setup
  cmd_run
}

# ---- arguments ----
COMMAND=""
NAME="elf-${USER:-tpu}"
ZONE=""
PROJECT=""
ACCELERATOR_TYPE="v5p-64"
RUNTIME_VERSION="v2-alpha-tpuv5"
CAPACITY=""
NO_QUEUE=0
POLL_SECONDS=30
REPO_URL=""
BRANCH=""
PYTHON="python3.11"
CONFIG=""
WORKDIR=""
MAIN_ARGS=()
DETACH=0
WORKER=0
DRY_RUN=0

while (( $# )); do
  arg="$1"
  shift
  # --opt=value and --opt value are both accepted for options with a value.
  case "$arg" in
    --config.*) MAIN_ARGS+=("$arg"); continue ;;
    --name | --zone | --project | --accelerator-type | --runtime-version | --poll-seconds | --repo | --branch | \
      --python | --config | --workdir | --worker)
      (( $# )) || die "$arg needs a value"
      value="$1"
      shift ;;
    --*=*) value="${arg#*=}"; arg="${arg%%=*}" ;;
    *) value="" ;;
  esac
  case "$arg" in
    create | setup | run | logs | delete | all)
      [[ -z "$COMMAND" ]] || die "two commands given: $COMMAND and $arg"
      COMMAND="$arg" ;;
    --name) NAME="$value" ;;
    --zone) ZONE="$value" ;;
    --project) PROJECT="$value" ;;
    --accelerator-type) ACCELERATOR_TYPE="$value" ;;
    --runtime-version) RUNTIME_VERSION="$value" ;;
    --spot | --reserved)
      [[ -z "$CAPACITY" || "$CAPACITY" == "${arg#--}" ]] || die "--spot and --reserved exclude each other"
      CAPACITY="${arg#--}" ;;
    --no-queue) NO_QUEUE=1 ;;
    --poll-seconds) POLL_SECONDS="$value" ;;
    --repo) REPO_URL="$value" ;;
    --branch) BRANCH="$value" ;;
    --python) PYTHON="$value" ;;
    --config) CONFIG="$value" ;;
    --workdir) WORKDIR="$value" ;;
    --detach) DETACH=1 ;;
    --worker) WORKER="$value" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) MAIN_ARGS+=("$@"); break ;;
    *) die "unknown argument: $arg" ;;
  esac
done

[[ -n "$COMMAND" ]] || die "no command given (create, setup, run, logs, delete or all)"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name=$NAME: use lower-case letters, digits and '-'"
[[ "$POLL_SECONDS" =~ ^[1-9][0-9]*$ ]] || die "--poll-seconds=$POLL_SECONDS must be a positive integer"
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "--worker=$WORKER must be a worker index or all"
[[ -n "$BRANCH" && -z "$REPO_URL" ]] && die "--branch needs --repo=URL"
command -v gcloud >/dev/null || (( DRY_RUN )) || die "gcloud not found on PATH; install the Google Cloud SDK"

"cmd_$COMMAND"
