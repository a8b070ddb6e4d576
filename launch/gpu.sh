#!/usr/bin/env bash
# GPU launcher for elf_jax: runs `python -m elf_jax.main` on this node. One node: a plain single-process run over
# all local GPUs. Several nodes: run this script once per node, each with the same --coordinator and
# --num-processes and its own --process-id; jax.distributed then joins them into one mesh. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --config=PATH --workdir=DIR [options] [-- MAIN_ARGS...]

Options:
  --config PATH          config file (e.g. configs/owt_b.py); run from the repo root
  --workdir DIR          output directory; on several nodes one shared path (NFS, gs://...)
  --config.KEY=VALUE     config override, passed to main (as is everything after --)
  --coordinator H:P      several nodes: host:port of process 0, reachable from every node
  --num-processes N      several nodes: number of processes (one per node)
  --process-id I         several nodes: this node's index, 0 .. N-1 (0 runs on the coordinator host)
  --python PY            interpreter (default python3)
  --dry-run              print the environment and command instead of running them
  -h, --help             this help

Without --coordinator/--num-processes/--process-id the run is single-process (ELF_DISTRIBUTED=0).

Example, two nodes (run on node 0, then the same with --process-id=1 on node 1):
  launch/gpu.sh --config=configs/owt_b.py --workdir=/shared/elf-b \
      --coordinator=10.0.0.1:12345 --num-processes=2 --process-id=0 -- --config.mesh.fsdp=8
EOF
}

die() {
  echo "gpu.sh: $*" >&2
  echo "Run 'launch/gpu.sh --help' for usage." >&2
  exit 2
}

CONFIG=""
WORKDIR=""
COORDINATOR=""
NUM_PROCESSES=""
PROCESS_ID=""
PYTHON="python3"
DRY_RUN=0
MAIN_ARGS=()

while (( $# )); do
  arg="$1"
  shift
  # --opt=value and --opt value are both accepted for options with a value.
  case "$arg" in
    --config.*) MAIN_ARGS+=("$arg"); continue ;;
    --config | --workdir | --coordinator | --num-processes | --process-id | --python)
      (( $# )) || die "$arg needs a value"
      value="$1"
      shift ;;
    --*=*) value="${arg#*=}"; arg="${arg%%=*}" ;;
    *) value="" ;;
  esac
  case "$arg" in
    --config) CONFIG="$value" ;;
    --workdir) WORKDIR="$value" ;;
    --coordinator) COORDINATOR="$value" ;;
    --num-processes) NUM_PROCESSES="$value" ;;
    --process-id) PROCESS_ID="$value" ;;
    --python) PYTHON="$value" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) MAIN_ARGS+=("$@"); break ;;
    *) die "unknown argument: $arg" ;;
  esac
done

[[ -n "$CONFIG" ]] || die "--config=PATH is required (e.g. --config=configs/owt_b.py)"
[[ -n "$WORKDIR" ]] || die "--workdir=DIR is required"

ENV_VARS=()
if [[ -z "$COORDINATOR$NUM_PROCESSES$PROCESS_ID" ]]; then
  ENV_VARS+=(ELF_DISTRIBUTED=0)
else
  [[ -n "$COORDINATOR" && -n "$NUM_PROCESSES" && -n "$PROCESS_ID" ]] ||
    die "several nodes need all of --coordinator, --num-processes and --process-id"
  [[ "$COORDINATOR" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "--coordinator=$COORDINATOR must be host:port"
  [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--num-processes=$NUM_PROCESSES must be a positive integer"
  [[ "$PROCESS_ID" =~ ^(0|[1-9][0-9]*)$ ]] && (( PROCESS_ID < NUM_PROCESSES )) ||
    die "--process-id=$PROCESS_ID must be an integer in 0 .. $((NUM_PROCESSES - 1))"
  ENV_VARS+=(ELF_DISTRIBUTED=1 "ELF_COORDINATOR_ADDRESS=$COORDINATOR" "ELF_NUM_PROCESSES=$NUM_PROCESSES"
    "ELF_PROCESS_ID=$PROCESS_ID")
fi
COMMAND=("$PYTHON" -m elf_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${MAIN_ARGS[@]}")

if (( DRY_RUN )); then
  line="$(printf '%q ' "${ENV_VARS[@]}" "${COMMAND[@]}")"
  echo "${line% }"
else
  exec env "${ENV_VARS[@]}" "${COMMAND[@]}"
fi
