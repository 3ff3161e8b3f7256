"""Benchmark: training tokens/s of our jitted E2LLM step against transformers + peft doing the same work.

Ends with `train_tokens_per_s_ratio=<ours / best PyTorch variant>`, in float32 (or the first dtype
run when float32 is not).

Same model and work on both sides: MiniLM-L6 (LoRA on query/key/value/attention output) over B×N
chunks of T tokens, mean pooling, the 2-layer adapter, SmolLM2-135M (LoRA on q/k/v/o) over
prefix ‖ soft ‖ query ‖ target, cross entropy on the target tokens, AdamW on LoRA + adapter. Ours is
`training.step.make_train_step` on a one-device mesh; PyTorch runs eager and under `torch.compile`,
both of the whole loss (`torch_compile`) and of each encoder and decoder layer, the rest eager
(`torch_compile_layers`: PyTorch's regional compilation, which compiles one layer's code and reuses it
for the others; as fast as the whole on the AVX2 EPYC and 5x quicker to compile, bench/RESULTS.md).
Each side runs in its own process (sides alternate order between rounds) and loads SmolLM2 from
the same float32 folder (`_sides.decoder_folder`); after a warm-up step the median step time of
`--steps` steps counts; tokens = encoder tokens + decoder tokens per step.
`--step-budget S` stops a side whose warm-up and steps are not done S seconds after its model is
built, and reports it as over the budget (`make bench` bounds PyTorch's bf16 side so).

Usage: `python bench/train_throughput.py [--dtypes float32,bfloat16] [--batch 4] [--chunks 16]
[--steps 5] [--rounds 1] [--compile both|whole|layers|none] [--step-budget S]`
(`--no-compile` is `--compile none`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _sides  # pylint: disable=wrong-import-position

ENCODER_LORA, DECODER_LORA = 8, 8
LORA_ALPHA = 16.0


def shapes(args) -> dict:
  return dict(batch=args.batch, chunks=args.chunks, chunk_tokens=args.chunk_tokens,
              prefix=args.prefix, query=args.query, target=args.target)


def tokens_per_step(s: dict) -> int:
  decoder = s["prefix"] + s["chunks"] + s["query"] + s["target"]
  return s["batch"] * (s["chunks"] * s["chunk_tokens"] + decoder)


def random_batch(s: dict, seed: int = 0) -> dict:
  """Token arrays of the model's batch layout, every slot real; half instruction, half recon."""
  import numpy as np
  rng = np.random.default_rng(seed)
  ids = lambda *shape: rng.integers(5, 20000, shape).astype(np.int32)
  ones = lambda *shape: np.ones(shape, np.int32)
  b = s["batch"]
  return {"chunk_ids": ids(b, s["chunks"], s["chunk_tokens"]),
          "chunk_token_mask": ones(b, s["chunks"], s["chunk_tokens"]),
          "chunk_mask": ones(b, s["chunks"]), "prefix_ids": ids(b, s["prefix"]),
          "prefix_mask": ones(b, s["prefix"]), "query_ids": ids(b, s["query"]),
          "query_mask": ones(b, s["query"]), "target_ids": ids(b, s["target"]),
          "target_mask": ones(b, s["target"]), "task": (np.arange(b) % 2).astype(np.int32),
          "chunks_dropped": np.zeros((b,), np.int32)}


def jax_side(s: dict, dtype: str, steps: int, decoder_path: str | None = None) -> dict:
  config, setup, mesh = jax_setup(s, dtype, decoder_path=decoder_path)
  _sides.ready()
  return time_train_step(config, setup, mesh, random_batch(s), steps)


def jax_setup(s: dict, dtype: str, scan_layers: bool = True, decoder_path: str | None = None):
  """(config, train setup, mesh) of our side: real towers (the decoder from `decoder_path`, else
  its GGUF), one-device mesh."""
  from e2llm_jax import assets, config_utils, sharding
  from e2llm_jax.models import e2llm
  from e2llm_jax.training import state as state_lib
  config = config_utils.base_config()
  config.model.encoder.path = str(assets.minilm_dir())
  config.model.decoder.path = decoder_path or str(assets.smollm2_gguf())
  config.model.pooling, config.model.compute_dtype = "mean", dtype
  config.lora.encoder_rank, config.lora.decoder_rank = ENCODER_LORA, DECODER_LORA
  config.lora.encoder_alpha = config.lora.decoder_alpha = LORA_ALPHA
  config.train.batch_size, config.data.max_chunks = s["batch"], s["chunks"]
  config.data.chunk_tokens = s["chunk_tokens"]
  config.mesh.shape = (1, 1, 1)
  config.model.scan_layers = scan_layers
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  setup = state_lib.create_train_state(config, mesh)
  setup.frozen = e2llm.frozen_at_rest(setup.frozen)  # as the training loop passes them
  return config, setup, mesh


def compile_train_step(config, setup, mesh, batch: dict):
  """(the jitted train step compiled ahead of time, the batch placed as it expects, compile s)."""
  import time
  import jax
  from e2llm_jax.training import step as step_lib
  step = step_lib.make_train_step(config, setup, batch)
  shardings = step_lib.batch_shardings_for(config, mesh, batch)
  batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
  start = time.perf_counter()
  compiled = step.lower(setup.state, setup.frozen, batch).compile()
  return compiled, batch, time.perf_counter() - start


def time_train_step(config, setup, mesh, batch: dict, steps: int, print_memory: bool = False) -> dict:
  """Compile the jitted train step ahead of time, then the median of `steps` timed steps."""
  from e2llm_jax.training import step as step_lib
  compiled, batch, compile_s = compile_train_step(config, setup, mesh, batch)
  if print_memory:
    print(step_lib.memory_report(compiled), flush=True)
  one = stepper(compiled, setup, batch)
  one()
  median, times = _sides.timed(one, steps)
  return {"seconds": median, "times": times, "compile_s": compile_s}


def stepper(compiled, setup, batch: dict):
  """One blocking call of the compiled train step that carries its state from call to call."""
  import jax
  state = setup.state

  def one():
    nonlocal state
    state, metrics = compiled(state, setup.frozen, batch)
    jax.block_until_ready(metrics)
  return one


def add_shape_args(parser: argparse.ArgumentParser) -> None:
  """The step's shapes, shared with roofline.py."""
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--chunks", type=int, default=16)
  parser.add_argument("--chunk-tokens", type=int, default=128)
  parser.add_argument("--prefix", type=int, default=32)
  parser.add_argument("--query", type=int, default=64)
  parser.add_argument("--target", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)


def shape_flags(args) -> list[str]:
  """The `add_shape_args` flags with their values, for a side run in its own process."""
  return [f"--{key.replace('_', '-')}={value}"
          for key, value in dict(shapes(args), steps=args.steps).items()]


def torch_side(s: dict, dtype: str, steps: int, compile_scope: str | None,
               decoder_path: str) -> dict:
  """PyTorch's step; `compile_scope` None (eager), "whole" (the loss) or "layers" (each layer)."""
  import time
  import peft
  import torch
  import transformers
  from e2llm_jax import assets
  torch_dtype = getattr(torch, dtype)
  decoder = transformers.AutoModelForCausalLM.from_pretrained(
      decoder_path, dtype=torch_dtype, attn_implementation="sdpa")
  encoder = transformers.BertModel.from_pretrained(str(assets.minilm_dir()), dtype=torch_dtype,
                                                   attn_implementation="sdpa")
  encoder = peft.get_peft_model(encoder, peft.LoraConfig(
      r=ENCODER_LORA, lora_alpha=LORA_ALPHA,
      target_modules=["query", "key", "value", "attention.output.dense"]))
  decoder = peft.get_peft_model(decoder, peft.LoraConfig(
      r=DECODER_LORA, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
  width, out = encoder.config.hidden_size, decoder.config.hidden_size
  adapter = torch.nn.Sequential(torch.nn.Linear(width, out), torch.nn.GELU(),
                                torch.nn.Linear(out, out)).to(torch_dtype)
  params = [p for m in (encoder, decoder, adapter) for p in m.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-4)
  batch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in random_batch(s).items()}
  embed = decoder.get_input_embeddings()
  b, n, t = batch["chunk_ids"].shape

  def loss_fn():
    hidden = encoder(input_ids=batch["chunk_ids"].reshape(b * n, t),
                     attention_mask=batch["chunk_token_mask"].reshape(b * n, t)).last_hidden_state
    weights = batch["chunk_token_mask"].reshape(b * n, t, 1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    soft = adapter(pooled).reshape(b, n, -1)
    embeds = torch.cat([embed(batch["prefix_ids"]), soft, embed(batch["query_ids"]),
                        embed(batch["target_ids"])], dim=1)
    target_len = batch["target_ids"].shape[1]
    # Logits only where a target token is predicted: the last target_len + 1 slots, less one.
    logits = decoder(inputs_embeds=embeds, logits_to_keep=target_len + 1,
                     use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             batch["target_ids"].reshape(-1))

  if compile_scope == "whole":
    loss_fn = torch.compile(loss_fn)
  elif compile_scope == "layers":
    for layer in [*encoder.base_model.model.encoder.layer, *decoder.base_model.model.model.layers]:
      layer.compile()

  def one():
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    optimizer.step()

  _sides.ready()
  start = time.perf_counter()
  one()  # warm-up (torch.compile compiles here)
  warmup_s = time.perf_counter() - start
  median, times = _sides.timed(one, steps)
  return {"seconds": median, "times": times, "compile_s": warmup_s}


COMPILE_SCOPES = {"torch_eager": None, "torch_compile": "whole", "torch_compile_layers": "layers"}
SIDES = ("jax", *COMPILE_SCOPES)


def sides_to_run(compile_choice: str) -> list[str]:
  """The sides `--compile` asks for: ours, PyTorch eager and the chosen torch.compile sides."""
  keep = {"both": ("whole", "layers"), "none": ()}.get(compile_choice, (compile_choice,))
  return [x for x in SIDES if x in ("jax", "torch_eager") or COMPILE_SCOPES[x] in keep]


def train_env(side: str, dtype: str) -> dict:
  """Each side's process settings as its users run it: ours as train.py does (huge pages in
  float32; they made PyTorch's eager step no faster and its first token slower, so its sides run
  without)."""
  from e2llm_jax import host_memory
  return host_memory.huge_page_env(dtype) if side == "jax" else {}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtypes", default="float32,bfloat16")
  add_shape_args(parser)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--compile", choices=("both", "whole", "layers", "none"), default="both",
                      help="which torch.compile sides run: of the whole loss, of each layer")
  parser.add_argument("--no-compile", dest="compile", action="store_const", const="none",
                      help="no torch.compile side (--compile none)")
  parser.add_argument("--side-timeout", type=float, default=1800)
  parser.add_argument("--step-budget", type=float, help="seconds a side's steps may take")
  parser.add_argument("--side", help=argparse.SUPPRESS)
  parser.add_argument("--dtype", help=argparse.SUPPRESS)
  parser.add_argument("--decoder", help=argparse.SUPPRESS)
  args = parser.parse_args()
  s = shapes(args)
  if args.side:
    if args.side == "jax":
      result = jax_side(s, args.dtype, args.steps, args.decoder)
    else:
      result = torch_side(s, args.dtype, args.steps, COMPILE_SCOPES[args.side], args.decoder)
    result["tokens_per_s"] = tokens_per_step(s) / result["seconds"]
    _sides.emit(dict(result, side=args.side, dtype=args.dtype))
    return

  print(f"# {_sides.machine()}; shapes {s}; {tokens_per_step(s)} tokens per step")
  print("dtype side step_s tokens_per_s compile_s peak_MB")
  sides = sides_to_run(args.compile)
  passthrough = [*shape_flags(args), "--decoder", _sides.decoder_folder()]
  ratios = {}
  for dtype in args.dtypes.split(","):
    runs = {x: [] for x in sides}
    for round_index in range(args.rounds):
      for side in (sides if round_index % 2 == 0 else sides[::-1]):
        runs[side].append(_sides.run_side(__file__, ["--side", side, "--dtype", dtype,
                                                     *passthrough], args.side_timeout,
                                          env=train_env(side, dtype),
                                          step_budget_s=args.step_budget))
    best = {}
    for side, results in runs.items():
      ok = [r for r in results if "seconds" in r]
      result = results[0]
      if ok:
        result = dict(ok[0], tokens_per_s=statistics.median(r["tokens_per_s"] for r in ok))
        best[side] = result["tokens_per_s"]
      print(f"{dtype} {side} {_sides.fmt(result, 'seconds')} {_sides.fmt(result, 'tokens_per_s', 0)}"
            f" {_sides.fmt(result, 'compile_s', 1)} {_sides.fmt(result, 'peak_rss_mb', 0)}",
            flush=True)
      if "over_budget_s" in result:
        print(f"# {side}: its warm-up and {args.steps} steps were not done within "
              f"{result['over_budget_s']:.0f} s (--step-budget)")
    torch_best = max((v for k, v in best.items() if k != "jax"), default=None)
    if "jax" in best and torch_best:
      ratios[dtype] = best["jax"] / torch_best
      print(f"{dtype} ours/best_pytorch tokens/s = {ratios[dtype]:.3f}")
    elif "jax" in best:
      print(f"{dtype} ours/best_pytorch tokens/s: no PyTorch side measured")
  headline = ratios.get("float32", next(iter(ratios.values()), float("nan")))
  print(f"train_tokens_per_s_ratio={headline:.3f}")


if __name__ == "__main__":
  main()
