#!/usr/bin/env bash
# One prepared run for a lent GPU (H200): the paper's shapes with random weights, bf16, LoRA.
# Our attention kernel against the dense one, train-step MFU, then first token and full prefill at 32k and 128k, ours and PyTorch's; all under $OUT.
#
# Usage, from the repository root: OUT=/some/dir bash bench/gpu.sh
#   PY=python3          interpreter with jax[cuda], flax, optax, orbax-checkpoint, transformers and
#                       torch (default: python3)
#   WHEELS=dir          optional: wheels installed with --no-deps before the run (the GPU machine
#                       has no network), e.g. ml-collections; WHEELS/pins holds our pinned flax,
#                       optax and orbax, used only if the interpreter's own fail to import our code.
#                       Fetched on a machine with network: pip download --no-deps --only-binary=:all:
#                       --python-version 3.12 -d .whl ml-collections==1.1.0 (and -d .whl/pins ...)
#   GPU_BENCH_ARGS=...  extra flags for every part of bench/gpu_paper.py (e.g. "--batch 2")
#   GPU_PARTS=...       the parts to run (default: check train jax_long torch_long)
# Each part runs in its own process under its own time limit, so a hang or a crash in one still
# leaves the others' results; a summary table is printed last.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that receives the results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cuda  # the CPU benchmarks default to cpu; here a missing GPU is an error
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_site "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_site"
  if ! "$PY" -c "import e2llm_jax.training.state" 2>/tmp/gpu_import_error.txt && [ -d "$WHEELS/pins" ]; then
    echo "our code fails to import with the interpreter's packages; using WHEELS/pins:"
    tail -n 3 /tmp/gpu_import_error.txt
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_pins "$WHEELS"/pins/*.whl
    export PYTHONPATH="/tmp/gpu_pins:$PYTHONPATH"
  fi
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import importlib.metadata as m, sys
def version(p):
  try: return f'{p}=={m.version(p)}'
  except m.PackageNotFoundError: return f'{p} missing'
print(sys.version.split()[0], *map(version, ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint',
                                            'ml-collections', 'torch', 'transformers')))"
  "$PY" -c "import jax; print(jax.devices())"
} 2>&1 | tee "$OUT/environment.txt"

part() {  # part NAME SECONDS: one part of bench/gpu_paper.py, bounded; its log goes to parts.log
  timeout -k 15 "$2" "$PY" bench/gpu_paper.py --part "$1" --out "$OUT" ${GPU_BENCH_ARGS:-} \
    > "/tmp/gpu_$1.log" 2>&1
  local status=$?
  { echo "=== $1: exit $status"; cat "/tmp/gpu_$1.log"; } >> "$OUT/parts.log"
  echo "$1: exit $status ($(tail -c 300 "/tmp/gpu_$1.log" | tail -n 1))"
}
declare -A limit=([check]=60 [train]=180 [jax_long]=180 [torch_long]=120)  # seconds
for name in ${GPU_PARTS:-check train jax_long torch_long}; do part "$name" "${limit[$name]:-180}"; done
"$PY" bench/gpu_paper.py --part summary --out "$OUT"
