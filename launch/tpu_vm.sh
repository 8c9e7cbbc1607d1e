#!/usr/bin/env bash
# sinkformer on a Cloud TPU VM slice: create it, install, run on every worker, follow logs,
# delete it. Every worker runs the same command; jax.distributed.initialize() finds its peers
# by itself on TPU VMs.
#
#   launch/tpu_vm.sh create NAME                 # TYPE=v5p-128 ZONE=us-east5-a (env)
#   launch/tpu_vm.sh setup  NAME                 # copy this checkout (git HEAD), install
#   launch/tpu_vm.sh run    NAME -- sinkformer train --config experiments/wiki_1b.py:v5p_128 \
#                                   --workdir /mnt/shared/runs/wiki_1b
#   launch/tpu_vm.sh logs   NAME [WORKER]        # follow a worker's log (default 0)
#   launch/tpu_vm.sh stop   NAME                 # SIGTERM: checkpoint, then exit
#   launch/tpu_vm.sh delete NAME
#
# Environment: TYPE (accelerator type), ZONE, VERSION (TPU software), PROJECT (optional),
# SPOT=1 for a preemptible slice. DRY_RUN=1 prints the gcloud commands instead of running them.
# The workdir must be shared by all workers (e.g. a Filestore/NFS mount, or a bucket mounted
# with gcsfuse): every worker writes its shards of each checkpoint.
set -euo pipefail

TYPE=${TYPE:-v5p-128}
ZONE=${ZONE:-us-east5-a}
VERSION=${VERSION:-v2-alpha-tpuv5}
LOG='~/sinkformer.log'

gc() {
  local cmd=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}

action=${1:?usage: launch/tpu_vm.sh create|setup|run|logs|stop|delete NAME ...}
name=${2:?give the TPU VM name}
shift 2

case "$action" in
  create)
    gc create "$name" --accelerator-type="$TYPE" --version="$VERSION" ${SPOT:+--spot} ;;
  setup)
    archive=$(mktemp --suffix=.tar.gz)
    git archive --format=tar.gz -o "$archive" HEAD
    gc scp "$archive" "$name":~/sinkformer.tar.gz --worker=all
    gc ssh "$name" --worker=all --command='mkdir -p ~/sinkformer && tar xzf ~/sinkformer.tar.gz -C ~/sinkformer && cd ~/sinkformer && python3 -m venv .venv && .venv/bin/pip install -q "jax[tpu]" && .venv/bin/pip install -q -e .'
    rm -f "$archive" ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || { echo "give the command after --" >&2; exit 2; }
    [[ "$1" == "sinkformer" ]] && set -- .venv/bin/sinkformer "${@:2}"
    command=$(printf '%q ' "$@")
    gc ssh "$name" --worker=all --command="cd ~/sinkformer && nohup $command > $LOG 2>&1 &" ;;
  logs)
    gc ssh "$name" --worker="${1:-0}" --command="tail -n 200 -F $LOG" ;;
  stop)
    gc ssh "$name" --worker=all --command="pkill -TERM -f 'sinkformer train' || true" ;;
  delete)
    gc delete "$name" --quiet ;;
  *)
    echo "unknown action $action: create|setup|run|logs|stop|delete" >&2; exit 2 ;;
esac
