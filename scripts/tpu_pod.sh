#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker, and
# --config.distributed=True makes each one call jax.distributed.initialize(), which finds the
# other workers through the TPU metadata server. Re-running the script resumes from WORKDIR.
#
#   export TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/shared/run1
#   scripts/tpu_pod.sh configs/paper_gte_llama2_7b.py:encoder=/mnt/gte,decoder=/mnt/llama2 \
#     --config.train.steps=3300
#
# Needs on every worker: this repository at REPO_DIR with its .venv (`make test` or
# `python -m venv .venv && .venv/bin/pip install -r requirements.txt -e .`, plus `jax[tpu]`),
# the model folders, and WORKDIR on storage all workers share (Filestore/NFS, or a bucket mounted
# with gcsfuse): every worker writes its own shards of each checkpoint there.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${WORKDIR:?set WORKDIR to a folder every worker can read and write}"
REPO_DIR="${REPO_DIR:-\$HOME/e2llm_jax}"  # expanded on the workers
CONFIG="${1:?usage: scripts/tpu_pod.sh CONFIG[:ARG] [--config.key=value ...]}"
shift

# Quote every argument so paths and tuples survive the remote shell.
ARGS="$(printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" --config.distributed=True "$@")"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd $REPO_DIR && .venv/bin/python train.py$ARGS"
