"""The inference engine on a tiny trained text run: KV-cache decoding, batching, SoftContext, sampling.

Also: bucketed calls compile once, a workdir restores and answers, and the answer CLI prints its three parts.
"""

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import tiny
from e2llm_jax import assets, hf
from e2llm_jax.data import pipeline
from e2llm_jax.inference import E2LLM, SoftContext, decoding
from e2llm_jax.models import bert, e2llm, llama
from e2llm_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENCODER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
COLORS = ("red", "green", "blue", "amber", "violet", "grey", "white")
PLACES = ("Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Lima", "Riga")


def document(sentences: int, salt: int = 0) -> str:
  """A made-up text of `sentences` sentences."""
  return " ".join(f"The {COLORS[(i + salt) % len(COLORS)]} box number {i * 7 + salt} was sent to "
                  f"{PLACES[(i * 3 + salt) % len(PLACES)]} on day {i + 1}."
                  for i in range(sentences))


def write_tower(folder: pathlib.Path, hf_config: dict, tensors: dict) -> None:
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(hf_config))
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  """A text run trained one step: tiny random towers saved as HF folders with real tokenizers."""
  root = tmp_path_factory.mktemp("inference")
  decoder_tokenizer = hf.load_tokenizer(assets.smollm2_gguf())
  encoder_cfg = bert.EncoderConfig(vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2,
                                   intermediate_size=32)
  decoder_cfg = llama.DecoderConfig(
      vocab_size=len(decoder_tokenizer), hidden_size=16, intermediate_size=32, num_layers=2,
      num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
      max_position_embeddings=2048, eos_token_id=decoder_tokenizer.eos_token_id,
      bos_token_id=decoder_tokenizer.bos_token_id, initializer_range=0.5)
  encoder_rng, decoder_rng = jax.random.split(jax.random.key(0))
  init = lambda module, cfg, rng: jax.jit(functools.partial(module.init_params, cfg))(rng)
  write_tower(root / "encoder", hf.encoder_config_to_hf(encoder_cfg),
              hf.to_hf_state_dict(encoder_cfg, init(bert, encoder_cfg, encoder_rng)))
  for name in ENCODER_FILES:
    (root / "encoder" / name).write_bytes((assets.minilm_dir() / name).read_bytes())
  write_tower(root / "decoder", hf.decoder_config_to_hf(decoder_cfg),
              hf.to_hf_state_dict(decoder_cfg, init(llama, decoder_cfg, decoder_rng)))
  decoder_tokenizer.save_pretrained(str(root / "decoder"))

  config = tiny.get_config()
  for tower in ("encoder", "decoder"):
    config.model[tower].random_init = None
    config.model[tower].path = str(root / tower)
  config.model.adapter_hidden = 16
  config.data.tasks = {"niah_single_1": 1.0, "recon": 0.5}
  config.data.ruler_samples = 4
  config.data.ruler_max_seq_length = 300
  config.data.chunk_tokens = 32
  config.data.max_chunks = 16
  config.data.recon_window = 1
  config.data.prefix_tokens = 64
  config.data.query_tokens = 96
  config.data.target_tokens = 32
  config.optim.warmup_steps = 0
  config.train.steps = 1
  config.train.eval_examples = 0
  config.ckpt.every_steps = 1
  config.ckpt.async_save = False
  loop.train(config, str(root / "run"))
  return root / "run"


@pytest.fixture(scope="module")
def engine(workdir) -> E2LLM:
  return E2LLM.from_workdir(workdir)


def test_from_workdir_restores_the_trained_step(engine):
  assert engine.step == 1
  decoder_lora = engine.trainable["decoder_lora"]
  lora_b = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(decoder_lora)
            if path[-1].key == "b"]
  assert lora_b and any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in lora_b)  # trained, not init
  answer = engine.generate("Where was box 7 sent?", document(12), max_new_tokens=5)
  assert isinstance(answer, str)


def test_greedy_with_the_cache_is_the_argmax_of_a_full_forward(engine):
  examples = pipeline.make_example_encoder(engine.config, engine.encoder_tokenizer,
                                           engine.decoder_tokenizer)
  rows = [examples.instruction(document(9), "Where did box 21 go?", ""),
          examples.instruction(document(4, salt=3), "Which colour was the box sent on day 2?", "")]
  batch = {k: np.stack([r[k] for r in rows]) for k in e2llm.BATCH_KEYS}
  steps = 6
  generated = engine.generate_arrays(batch, steps, eos_token_id=-1)  # -1: never stop
  assert generated.shape == (2, steps)

  # One causal forward over prompt + generated ids re-runs every step: the logits at the prompt's
  # last slot and at each generated id predict the next id. The prompt is laid out as training
  # lays it out (e2llm.splice), not as the engine packs it.
  @jax.jit
  def full_forward(frozen, trainable, batch, generated):
    model = engine.model
    soft = e2llm.soft_tokens(model, frozen, trainable, batch["chunk_ids"],
                             batch["chunk_token_mask"])
    embeds, mask = e2llm.splice(model, frozen, soft, batch, with_target=False)
    new = llama.embed(model.decoder, frozen["decoder"], generated[:, :-1])
    return llama.decoder_forward(
        model.decoder, frozen["decoder"], inputs_embeds=jnp.concatenate([embeds, new], axis=1),
        attention_mask=jnp.concatenate([mask, jnp.ones_like(generated[:, :-1])], axis=1),
        lora=e2llm.scaled_lora(trainable, "decoder_lora", model.decoder_lora))

  logits = full_forward(engine.frozen, engine.trainable, batch, generated)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits[:, -steps:]), axis=-1), generated)


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(engine):
  questions = ["Where?", "Which box was sent to Oslo on the third day of the month?",
               "Name the colour of box 14."]
  contexts = engine.compress([document(10), document(3, salt=1), document(17, salt=2)])
  assert len({c.num_soft_tokens for c in contexts}) == 3
  batched = engine.generate_batch(questions, contexts, max_new_tokens=8)
  alone = [engine.generate(q, c, max_new_tokens=8) for q, c in zip(questions, contexts)]
  assert batched == alone
  prompts = ["Say hi.", "Count from one to ten, slowly please."]
  texts = engine.generate_text(prompts, max_new_tokens=8)
  assert texts == [engine.generate_text([p], max_new_tokens=8)[0] for p in prompts]


def test_saved_soft_context_gives_identical_answers(engine, tmp_path):
  text = document(20)
  context = engine.compress(text)
  assert context.num_chunks > 1 and context.num_soft_tokens == context.num_chunks * 2
  assert "".join(context.chunk_texts) == text and context.chunk_texts == engine.chunk(text)
  assert context.compression_ratio == pytest.approx(
      len(engine.decoder_tokenizer(text, add_special_tokens=False)["input_ids"])
      / context.num_soft_tokens)
  loaded = SoftContext.load(context.save(tmp_path / "ctx"))
  np.testing.assert_array_equal(loaded.soft_tokens, context.soft_tokens)
  assert loaded.chunk_texts == context.chunk_texts and loaded.chunk_spans == context.chunk_spans
  assert loaded.compression_ratio == context.compression_ratio
  question = "Where was box 35 sent?"
  assert engine.generate(question, loaded, max_new_tokens=8) == engine.generate(
      question, context, max_new_tokens=8) == engine.generate(question, text, max_new_tokens=8)
  with pytest.raises(FileNotFoundError, match="not a saved SoftContext"):
    SoftContext.load(tmp_path / "missing")


def test_seeded_sampling_is_reproducible(engine):
  context = engine.compress(document(6))
  sample = lambda seed: engine.generate("Tell me.", context, max_new_tokens=8, temperature=1.0,
                                        top_k=50, top_p=0.95, seed=seed)
  assert sample(1) == sample(1)
  assert len({sample(seed) for seed in (1, 2, 3)}) > 1
  greedy = engine.generate("Tell me.", context, max_new_tokens=8)
  assert greedy == engine.generate("Tell me.", context, max_new_tokens=8, seed=5)


def test_filter_logits_keeps_top_k_then_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda k, p: np.isfinite(np.asarray(decoding.filter_logits(logits, jnp.int32(k),
                                                                     jnp.float32(p))))[0].tolist()
  assert keep(0, 1.0) == [True, True, True, True]
  assert keep(2, 1.0) == [True, True, False, False]
  assert keep(0, 0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
  assert keep(0, 0.81) == [True, True, True, False]
  assert keep(0, 0.1) == [True, False, False, False]  # the top token always stays
  assert keep(3, 0.99) == [True, True, True, False]


def test_stop_strings_end_the_answer(engine):
  context = engine.compress(document(5))
  full = engine.generate("Go on.", context, max_new_tokens=12)
  assert len(full) > 3
  stop = full[2:4]
  cut = engine.generate("Go on.", context, max_new_tokens=12, stop=[stop])
  assert cut == full[:full.find(stop)]


def test_a_second_call_in_the_same_bucket_compiles_nothing(engine):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  engine.generate("What was sent to Lima?", document(11), max_new_tokens=10)
  first = len(compiles)
  # Other texts, lengths, sampling settings and batch sizes within the same buckets.
  engine.generate("Which box went to Perth on day nine?", document(13, salt=4), max_new_tokens=12,
                  temperature=0.7, seed=3)
  engine.generate_batch(["a", "b"], [document(12), document(9)], max_new_tokens=9)
  assert len(compiles) == first
  jax.jit(lambda x: x * 3)(np.arange(3))  # the listener does see a compilation
  assert len(compiles) == first + 1


def test_long_contexts_go_beyond_max_chunks(engine):
  text = document(300)
  context = engine.compress(text)
  assert context.num_chunks > 4 * int(engine.config.data.max_chunks)
  assert isinstance(engine.generate("Where did box 70 go?", context, max_new_tokens=4), str)
  with pytest.raises(ValueError, match="exceeds the decoder's window"):
    engine.generate_text(["word " * 2100], max_new_tokens=4)


def test_embed_texts_are_unit_vectors_that_rank_the_same_text_first(engine):
  chunks = engine.chunk(document(30))
  vectors = engine.embed_texts(chunks)
  assert vectors.shape == (len(chunks), engine.model.encoder.hidden_size)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
  query = engine.embed_texts([chunks[3]])[0]
  assert int(np.argmax(vectors @ query)) == 3


def test_from_export_answers_like_the_workdir(engine, workdir, tmp_path):
  from e2llm_jax.hf import export  # pylint: disable=g-import-not-at-top
  out = export.export(workdir, tmp_path / "export", adapters_only=True)
  exported = E2LLM.from_export(out)
  text, question = document(8), "Where was box 28 sent?"
  context = engine.compress(text)
  np.testing.assert_allclose(exported.compress(text).soft_tokens, context.soft_tokens, atol=1e-5)
  assert exported.generate(question, context, max_new_tokens=8) == engine.generate(
      question, context, max_new_tokens=8)


def test_answer_cli_prints_answer_ratio_and_timings(workdir, tmp_path):
  context_file = tmp_path / "context.txt"
  context_file.write_text(document(15))
  result = subprocess.run(
      [sys.executable, "-m", "e2llm_jax.answer", "--workdir", str(workdir), "--context-file",
       str(context_file), "--question", "Where was box 7 sent?", "--max-new-tokens", "6"],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env={**__import__("os").environ, "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith("answer: ")
  assert lines[1].startswith("compression_ratio: ") and float(lines[1].split()[1]) > 1
  assert "compress" in lines[2] and "prefill" in lines[2] and "decode" in lines[2]
  missing = subprocess.run(
      [sys.executable, "-m", "e2llm_jax.answer", "--workdir", str(tmp_path), "--context-file",
       str(context_file), "--question", "q"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert missing.returncode == 2 and missing.stderr.startswith("error: ")
  assert "config.json" in missing.stderr and "Traceback" not in missing.stderr
