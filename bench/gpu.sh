#!/usr/bin/env bash
# One prepared run for a lent GPU (H200): the paper's shapes with random weights, bf16, LoRA.
# Train-step MFU, then E2LLM first token vs full-context prefill at 32k and 128k; all under $OUT.
#
# Usage, from the repository root: OUT=/some/dir bash bench/gpu.sh
#   PY=python3          interpreter with the project's requirements (default: .venv/bin/python if
#                       present, else python3)
#   WHEELS=dir          optional: install jax[cuda12] and the requirements from wheels in dir
#                       (the GPU machine has no network)
#   GPU_BENCH_ARGS=...  extra flags for bench/gpu_paper.py (e.g. "--batch 2 --lengths 32768")
set -euo pipefail
OUT=${OUT:?set OUT to the folder that receives the results}
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "jax[cuda12]" -r requirements.txt
  "$PY" -m pip install -q --no-index --no-deps -e .
fi
unset JAX_PLATFORMS  # the GPU, not the CPU default of the CPU benchmarks
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
{
  date -u
  nvidia-smi || true
  "$PY" -c "import jax; print(jax.__version__, jax.devices())"
} > "$OUT/environment.txt" 2>&1
# Bounded so that a hang still leaves the log of what finished.
timeout "${GPU_BENCH_TIMEOUT:-540}" "$PY" bench/gpu_paper.py --out "$OUT" ${GPU_BENCH_ARGS:-} \
  2>&1 | tee "$OUT/gpu_paper.log"
