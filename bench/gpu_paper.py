"""Benchmark for one GPU: the paper's shapes (GTE-large + Llama-2-7B, random weights, bf16).

Each `--part` runs in its own process (`bench/gpu.sh` runs them in turn), writing <out>/<part>.json:
- `check`: our attention through the GPU kernel ("auto": cuDNN) against our dense one, forward and
  gradient, for each kind of mask.
- `train`: the MFU of the jitted train step with LoRA (FLOPs counted as in `bench/roofline.py`,
  remat recomputation not counted), and the fraction of a plain bf16 matmul's measured rate.
- `jax_long` / `torch_long`: E2LLM time to first token (chunks → encoder → mean pool → MLP →
  decoder) and full-context Llama-2-7B prefill at each `--lengths`, ours and transformers' (SDPA),
  both without LoRA, with the memory each needs; OOM reported as such.
- `summary`: one table of what <out> holds, ending with `train_step_mfu=<value>`.
Random weights: speed does not depend on their values. `--trace` adds a Perfetto trace of the part
(`bench/gpu_trace.py` sums it by part of the model), `--dump` the optimized HLO of its first-token
or train-step functions (which names the trace's fusions); `--tiny` shrinks every shape so the
code paths can be checked on a CPU.

Usage: `python bench/gpu_paper.py --part check|train|jax_long|torch_long|summary --out DIR
[--batch 4] [--chunks 256] [--lengths 32768,131072] [--attention auto] [--remat off|POLICY]
[--trace] [--dump] [--tiny]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _sides  # pylint: disable=wrong-import-position
import roofline  # pylint: disable=wrong-import-position
import train_throughput  # pylint: disable=wrong-import-position
# Imports no jax, so the PyTorch part's process stays free of it.
from e2llm_jax import config_utils  # pylint: disable=wrong-import-position

GTE_LARGE = dict(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16,
                 intermediate_size=4096, max_position_embeddings=512)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                 intermediate_size=11008, max_position_embeddings=131072 + 1024)
TINY_ENCODER = dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                    max_position_embeddings=512)
TINY_DECODER = dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                    max_position_embeddings=131072 + 1024)


def paper_config(args):
  config = config_utils.paper_recipe(None)
  config.model.encoder.random_init = config_utils.random_tower(
      **(TINY_ENCODER if args.tiny else GTE_LARGE))
  config.model.decoder.random_init = config_utils.random_tower(
      **(TINY_DECODER if args.tiny else LLAMA2_7B))
  config.model.pooling, config.lora.dropout = "mean", 0.0
  config.train.batch_size, config.data.max_chunks = args.batch, args.chunks
  config.model.attention = args.attention
  config.model.remat = args.remat != "off"
  config.model.remat_policy = "nothing_saveable" if args.remat == "off" else args.remat
  config.mesh.shape = (1, 1, 1)
  return config


def train_step_mfu(args, config) -> dict:
  from e2llm_jax import sharding
  from e2llm_jax.training import state as state_lib
  s = dict(batch=args.batch, chunks=args.chunks, chunk_tokens=config.data.chunk_tokens,
           prefix=config.data.prefix_tokens, query=config.data.query_tokens,
           target=config.data.target_tokens)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  setup = state_lib.create_train_state(config, mesh)
  batch = train_throughput.random_batch(s)
  batch = {k: v % 1000 for k, v in batch.items()} if args.tiny else batch
  timing = train_throughput.time_train_step(config, setup, mesh, batch, args.steps,
                                            print_memory=True)
  seconds, compile_s = timing["seconds"], timing["compile_s"]
  flops = roofline.train_step_flops(setup.model.encoder, setup.model.decoder, s,
                                    config.lora.encoder_rank, config.lora.decoder_rank)
  # The rate a plain bf16 matmul reaches here: the ceiling the step could approach in practice.
  matmul = roofline.matmul_flops_per_s("bfloat16", repeats=10, size=256 if args.tiny else 8192)
  return {"remat": args.remat, "step_s": seconds, "compile_s": compile_s,
          "tflop_per_step": flops / 1e12,
          "mfu": flops / seconds / (args.peak_tflops * 1e12),
          "matmul_bf16_tflops": matmul / 1e12, "fraction_of_matmul_rate": flops / seconds / matmul}


def jax_models(config) -> tuple:
  """Model config and random weights placed as training and serving place them (`frozen_towers`:
  created by a jitted init already in their stored dtypes, no float32 copy of 7B). Without LoRA,
  as PyTorch's side runs: the same work on both sides."""
  import jax
  from e2llm_jax import sharding, towers
  from e2llm_jax.models import e2llm
  cfg, _ = towers.load_model(config)
  cfg = dataclasses.replace(cfg, encoder_lora=None, decoder_lora=None)
  rng = jax.random.key(0)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  frozen, _ = towers.frozen_towers(cfg, {tower: None for tower in towers.TOWERS}, mesh,
                                   config.mesh.rules, rng)
  return cfg, frozen, e2llm.init_trainable(cfg, frozen, rng)


def long_context(args, config, models: tuple, length: int) -> dict:
  """E2LLM first token (chunks → encoder → pool → adapter → decoder) and full-context prefill."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from e2llm_jax.models import e2llm, llama
  cfg, frozen, trainable = models
  chunk_tokens = config.data.chunk_tokens
  num_chunks = length // chunk_tokens
  ids = np.random.default_rng(0).integers(5, 1000, (1, length)).astype(np.int32)
  # Weights are arguments of the jitted functions, never closed over (they would be constants).
  last = lambda decoder, embeds: jnp.argmax(llama.logits_from_hidden(cfg.decoder, decoder,
      llama.decoder_forward(cfg.decoder, decoder, inputs_embeds=embeds,
                            return_hidden=True)[:, -1:]), axis=-1)

  def e2llm_first(frozen, trainable, chunk_ids):
    soft = e2llm.soft_tokens(cfg, frozen, trainable, chunk_ids, jnp.ones_like(chunk_ids))
    question = llama.embed(cfg.decoder, frozen["decoder"], chunk_ids[0, :1, :64])
    return last(frozen["decoder"], jnp.concatenate([soft.astype(question.dtype), question], axis=1))

  def full_first(frozen, trainable, ids):
    del trainable
    return last(frozen["decoder"], llama.embed(cfg.decoder, frozen["decoder"], ids))

  result = {"length": length, "chunks": num_chunks}
  runs = (("e2llm", e2llm_first, ids.reshape(1, num_chunks, chunk_tokens)),
          ("full", full_first, ids))
  for name, fn, inputs in runs:
    try:
      operands = (frozen, trainable, inputs)
      compiled = jax.jit(fn).lower(*operands).compile()
      # Weights + the compiled function's own buffers: the device memory this first token needs
      # (the process's peak also holds the weights' initialisation).
      memory = compiled.memory_analysis()
      result[f"{name}_needs_mb"] = round((memory.argument_size_in_bytes
                                          + memory.temp_size_in_bytes) / 2**20)
      compiled(*operands).block_until_ready()
      result[f"{name}_s"], _ = _sides.timed(lambda: compiled(*operands).block_until_ready(),
                                             args.repeats)
    except Exception as error:  # pylint: disable=broad-except
      oom = any(m in str(error) for m in _sides.OOM_MARKERS)
      result[f"{name}_s"] = "OOM" if oom else f"error: {str(error)[:300]}"
    stats = jax.local_devices()[0].memory_stats() or {}
    result[f"{name}_peak_mb_so_far"] = round(stats.get("peak_bytes_in_use", 0) / 2**20)
  return result


def torch_long_context(args, length: int, models: dict) -> dict:
  """The same two first tokens in transformers + PyTorch (bf16, SDPA), models built once."""
  import torch
  encoder, adapter, decoder = models["encoder"], models["adapter"], models["decoder"]
  cuda = models["device"] == "cuda"
  sync = torch.cuda.synchronize if cuda else lambda: None
  chunk_tokens = models["chunk_tokens"]
  num_chunks = length // chunk_tokens
  ids = torch.randint(5, 1000, (1, length), device=models["device"])
  chunk_ids = ids.reshape(num_chunks, chunk_tokens)
  last = lambda **kw: decoder(**kw, logits_to_keep=1, use_cache=False).logits.argmax(-1)

  def e2llm_first():
    soft = adapter(encoder(input_ids=chunk_ids).last_hidden_state.mean(1))[None]
    question = decoder.get_input_embeddings()(chunk_ids[:1, :64])
    return last(inputs_embeds=torch.cat([soft, question], dim=1))

  result = {"length": length, "chunks": num_chunks}
  for name, fn in (("e2llm", e2llm_first), ("full", lambda: last(input_ids=ids))):
    if cuda:
      torch.cuda.reset_peak_memory_stats()  # so the peak is this run's, as ours is
    try:
      with torch.inference_mode():
        fn()
        sync()
        result[f"{name}_s"], _ = _sides.timed(lambda: (fn(), sync()), args.repeats)
    except Exception as error:  # pylint: disable=broad-except
      oom = isinstance(error, torch.OutOfMemoryError)
      result[f"{name}_s"] = "OOM" if oom else f"error: {str(error)[:300]}"
      torch.cuda.empty_cache() if cuda else None
    if cuda:
      result[f"{name}_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
  return result


def torch_models(config) -> dict:
  """Our towers' architectures in transformers (the configs our export writes), random, bf16, SDPA,
  with the MLP adapter, on the GPU (if any)."""
  import torch
  import transformers
  from e2llm_jax import towers
  from e2llm_jax.hf import configs
  cfg, _ = towers.load_model(config)
  as_torch = lambda hf: dict(hf, dtype="bfloat16", attn_implementation="sdpa")
  torch.set_default_dtype(torch.bfloat16)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with torch.device(device):
    encoder = transformers.BertModel(transformers.BertConfig(
        **as_torch(configs.encoder_config_to_hf(cfg.encoder))), add_pooling_layer=False).eval()
    decoder = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **as_torch(configs.decoder_config_to_hf(cfg.decoder)))).eval()
    width, out = cfg.encoder.hidden_size, cfg.decoder.hidden_size
    adapter = torch.nn.Sequential(torch.nn.Linear(width, out), torch.nn.GELU(),
                                  torch.nn.Linear(out, out))
  return {"encoder": encoder, "adapter": adapter, "decoder": decoder, "device": device,
          "chunk_tokens": config.data.chunk_tokens}


def check_kernels(args) -> list:
  """Our attention through the GPU kernel ("auto") against the dense one ("xla"), bf16, forward and
  gradient, for each mask kind the kernel takes: relative error ‖a − b‖ / ‖b‖ per case."""
  import jax
  import jax.numpy as jnp
  from e2llm_jax.models import attention
  length = 64 if args.tiny else 2048
  q, k, v = (jax.random.normal(jax.random.key(i), (2, length, 8, 64), jnp.bfloat16)
             for i in range(3))
  slots = jnp.broadcast_to(jnp.arange(length), (2, length))
  right = jnp.arange(length)[None] < jnp.asarray([[length], [length * 3 // 4]])
  # Padding in holes, as in the train step's decoder rows (prefix ‖ soft ‖ query ‖ target).
  holes = jax.random.bernoulli(jax.random.key(3), 0.7, (2, length))
  cases = {"padding": attention.key_padding_mask(right),
           "padding in holes": attention.key_padding_mask(holes),
           "causal, right padding": attention.AttentionMask(right, slots, aligned=True),
           "causal, left padding": attention.AttentionMask(right[:, ::-1], slots, aligned=True),
           "causal, holes": attention.AttentionMask(holes, slots, aligned=True)}
  results = []
  for name, mask in cases.items():
    rows = mask.key_valid[:, :, None, None] if mask.causal else 1.0  # padded causal rows: unread
    loss = lambda q, kind: jnp.sum((attention.attention(q, k, v, mask, kind) * rows)
                                   .astype(jnp.float32) ** 2)
    error = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32))
                               / jnp.linalg.norm(b.astype(jnp.float32)))
    got, want = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(q, kind)
                 for kind in ("auto", "xla"))
    kernel = attention.resolve("auto", length, length, q.dtype, mask)
    if kernel == "cudnn" and not bool(attention.right_padded(mask.key_valid)):
      kernel = "cudnn, real keys moved to the front"
    results.append({"case": name, "kernel": kernel, "loss_rel_error": error(got[0], want[0]),
                    "grad_rel_error": error(got[1], want[1])})
  return results


def summarize(out: pathlib.Path) -> None:
  """One table of the parts' results in `out`, ours over PyTorch's, and the train step's MFU."""
  read = lambda part: (json.loads((out / f"{part}.json").read_text())
                       if (out / f"{part}.json").exists() else None)
  train, ours, theirs = read("train"), read("jax_long") or [], read("torch_long") or []
  for case in read("check") or []:
    print(f"{case['kernel']} vs xla, {case['case']}: loss {case['loss_rel_error']:.1e}, "
          f"gradient {case['grad_rel_error']:.1e} (relative)")
  if train:
    print(f"train step (remat {train.get('remat')}) {train['step_s']:.3f} s, "
          f"{train['tflop_per_step']:.1f} TFLOP, compile {train['compile_s']:.0f} s, "
          f"MFU {train['mfu']:.3f}, bf16 matmul {train['matmul_bf16_tflops']:.0f} TFLOP/s "
          f"({train['fraction_of_matmul_rate']:.3f} of it)")
  show = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)
  speed = lambda a, b: f"{b / a:.2f}x" if all(isinstance(x, float) for x in (a, b)) else "n/a"
  print("length | e2llm ours s | torch s | ours/torch speed | full ours s | torch s | "
        "ours/torch speed | best full / ours e2llm | e2llm MB ours needs / torch peak | "
        "full MB ours needs / torch peak")
  by_length = {r["length"]: r for r in theirs}
  for mine in ours:
    other = by_length.get(mine["length"], {})
    e, te = mine.get("e2llm_s"), other.get("e2llm_s")
    f, tf = mine.get("full_s"), other.get("full_s")
    fulls = [x for x in (f, tf) if isinstance(x, float)]
    print(f"{mine['length']} | {show(e)} | {show(te)} | {speed(e, te)} | {show(f)} | {show(tf)} | "
          f"{speed(f, tf)} | {speed(e, min(fulls)) if fulls else 'n/a'} | "
          f"{mine.get('e2llm_needs_mb')} / {other.get('e2llm_peak_mb')} | "
          f"{mine.get('full_needs_mb')} / {other.get('full_peak_mb')}")
  if train:
    print(f"train_step_mfu={train['mfu']:.3f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("check", "train", "jax_long", "torch_long", "summary"),
                      required=True)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--chunks", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--lengths", default="32768,131072")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs per first token")
  parser.add_argument("--attention", default="auto", help="config key model.attention")
  parser.add_argument("--remat", default="nothing_saveable",
                      choices=("off",) + config_utils.REMAT_POLICIES,
                      help="train: off, or the model.remat_policy (the paper recipe's: default)")
  parser.add_argument("--peak-tflops", type=float, default=989.0,
                      help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
  parser.add_argument("--trace", action="store_true",
                      help="trace the part, CUDA graphs off: <out>/<part>_trace.json.gz "
                           "(Perfetto; summed by part with bench/gpu_trace.py)")
  parser.add_argument("--dump", action="store_true",
                      help="the part's optimized HLO, naming a trace's fusions: <out>/<part>_hlo.txt")
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--out", default=None, help="folder for <part>.json")
  args = parser.parse_args()
  if args.part == "summary":
    return summarize(pathlib.Path(args.out))
  lengths = [int(x) for x in args.lengths.split(",")]
  print(f"# {args.part}; {_sides.machine()}", flush=True)
  results = []

  def record(result) -> None:  # printed and written as each result comes: a timeout loses no other
    results.append(result)
    print(json.dumps(result), flush=True)
    if args.out:
      pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
      (pathlib.Path(args.out) / f"{args.part}.json").write_text(
          json.dumps(results[0] if args.part == "train" else results, indent=1))

  if args.part == "torch_long":
    models = torch_models(paper_config(args))
    for length in lengths:
      record(torch_long_context(args, length, models))
    return
  if args.trace:  # under CUDA graphs the profiler failed the train step and kernels lose op names
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  dump_dir = tempfile.mkdtemp(prefix="gpu_hlo_")
  if args.dump:  # read when the backend starts, which the next lines do
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                               " --xla_dump_hlo_module_re=.*(first|train_step).*")
  import jax
  print(f"# {jax.__version__} {jax.devices()}", flush=True)
  config = paper_config(args)
  if args.trace:
    trace_dir = tempfile.mkdtemp(prefix="gpu_trace_")
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # device kernels and XLA ops, not every Python call
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True, profiler_options=options)
  if args.part == "check":
    for case in check_kernels(args):
      record(case)
  elif args.part == "train":
    record(train_step_mfu(args, config))
    print(f"train_step_mfu={results[0]['mfu']:.3f}")
  else:
    models = jax_models(config)
    for length in lengths:
      record(long_context(args, config, models, length))
  modules = sorted(pathlib.Path(dump_dir).glob("*after_optimizations.txt"))
  if modules:
    (pathlib.Path(args.out) / f"{args.part}_hlo.txt").write_text(
        "".join(f"// {m.name}\n{m.read_text()}\n" for m in modules))
  if args.trace:
    jax.profiler.stop_trace()
    for trace in pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"):
      shutil.copy(trace, pathlib.Path(args.out) / f"{args.part}_trace.json.gz")


if __name__ == "__main__":
  main()
