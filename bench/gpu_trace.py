"""Where a GPU run's kernel time goes: a Perfetto trace from `gpu_paper.py --trace`, summed by part.

Parts per tower (encoder, decoder): matmuls (recomputed ones apart), elementwise; attention; rest.

Each kernel in the trace carries the HLO module it ran for and the name of its source op (flax
module path, `jvp(...)` forward, `transpose(jvp(...))` backward, `rematted_computation` recomputed).
Times are per execution of `--module`: the kernel time of all its runs divided by `--runs`.
Ends with `kernel_ms_per_run=<value>`.

Usage: `python bench/gpu_trace.py OUT/train_trace.json.gz --module jit_train_step --runs 3
[--top 20]`
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def part(source: str) -> str:
  """The part of the model a kernel's source op belongs to."""
  tower = "encoder" if "Encoder" in source else "decoder" if "Decoder" in source else None
  if "dot_product_attention" in source:
    return "attention (cuDNN)"
  if tower is None:
    return "rest"
  if "dot_general" in source:
    return f"{tower} matmuls" + (" (recomputed)" if "rematted_computation" in source else "")
  return f"{tower} elementwise"


def kernels(path: str, module: str) -> list[dict]:
  """The GPU kernels (not copies) the trace records for `module`."""
  events = json.load(gzip.open(path))["traceEvents"]
  return [e for e in events if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == module
          and not e["name"].startswith(("Memcpy", "Memset"))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace")
  parser.add_argument("--module", default="jit_train_step",
                      help="HLO module: jit_train_step, jit_e2llm_first, jit_full_first")
  parser.add_argument("--runs", type=int, default=1, help="executions of the module in the trace")
  parser.add_argument("--top", type=int, default=15, help="also list the largest source ops")
  args = parser.parse_args()
  found = kernels(args.trace, args.module)
  if not found:
    raise SystemExit(f"No kernels of module {args.module!r} in {args.trace}; the trace's modules "
                     "are named jit_<function name>.")
  by_part, by_source = collections.Counter(), collections.Counter()
  for event in found:
    source = event.get("args", {}).get("name", "") or event["name"]
    by_part[part(source)] += event["dur"]
    by_source[source[-110:]] += event["dur"]
  total = sum(by_part.values())
  per_run = lambda us: us / 1e3 / args.runs
  print(f"# {args.module}: {len(found)} kernels over {args.runs} run(s)")
  for name, us in by_part.most_common():
    print(f"{per_run(us):9.1f} ms {100 * us / total:5.1f}%  {name}")
  print("# largest source ops")
  for name, us in by_source.most_common(args.top):
    print(f"{per_run(us):9.1f} ms {100 * us / total:5.1f}%  {name}")
  print(f"kernel_ms_per_run={per_run(total):.1f}")


if __name__ == "__main__":
  main()
