"""The inference engine on a tiny trained text run: KV-cache decoding, batching, SoftContext, sampling.

Also: bucketed calls compile once, a workdir restores and answers, and the answer CLI prints its three parts.
"""

import dataclasses
import functools
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import tiny
from e2llm_jax import assets, checkpoint, errors, hf
from e2llm_jax.data import chunking, pipeline
from e2llm_jax.inference import E2LLM, SoftContext, decoding
from e2llm_jax.inference import engine as engine_lib
from e2llm_jax.models import bert, e2llm, layers, llama, packing
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


def text_run_config(root: pathlib.Path):
  """configs/tiny.py on tiny random towers saved under `root` as HF folders with real tokenizers,
  reading RULER needles and restating their chunks."""
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
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  """A text run trained one step."""
  root = tmp_path_factory.mktemp("inference")
  loop.train(text_run_config(root), str(root / "run"))
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


def test_given_soft_tokens_stand_in_for_the_encoded_chunks(engine):
  examples = pipeline.make_example_encoder(engine.config, engine.encoder_tokenizer,
                                           engine.decoder_tokenizer)
  rows = [examples.instruction(document(5), "Where did box 3 go?", "to the port"),
          examples.instruction(document(2, salt=1), "Which colour was box 1?", "red")]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in e2llm.BATCH_KEYS}
  model, frozen, trainable = engine.model, engine.frozen, engine.trainable
  logits = functools.partial(e2llm.target_logits, model, frozen, trainable, batch)
  soft = e2llm.soft_tokens(model, frozen, trainable, batch["chunk_ids"], batch["chunk_token_mask"],
                           grouped=False)
  soft_mask = e2llm.soft_token_mask(model, batch["chunk_mask"], batch["chunk_token_mask"])
  np.testing.assert_allclose(logits(soft=soft, soft_mask=soft_mask), logits(), rtol=1e-5, atol=1e-5)
  # Slots the mask hides never count, whatever they hold and however many there are.
  hidden_slots = jnp.where(soft_mask[..., None] > 0, soft, 1e3)
  wider = jnp.concatenate([hidden_slots, jnp.full_like(soft[:, :3], -1e3)], axis=1)
  wider_mask = jnp.concatenate([soft_mask, jnp.zeros_like(soft_mask[:, :3])], axis=1)
  np.testing.assert_allclose(logits(soft=wider, soft_mask=wider_mask), logits(), rtol=1e-4,
                             atol=1e-4)


def test_lora_merged_for_inference_serves_the_same_model(engine):
  model, frozen = engine.model, engine.frozen
  # LoRA far from its trained-one-step size, so that merging it wrongly would show.
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf * 300 if path[-1].key == "b" else leaf, engine.trainable)
  merged_frozen, served = e2llm.merge_lora(model, frozen, trainable)
  assert "encoder_lora" not in served and "decoder_lora" not in served
  assert served["adapter"] is trainable["adapter"]
  assert (merged_frozen["decoder"]["embed_tokens"]["embedding"]
          is frozen["decoder"]["embed_tokens"]["embedding"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), frozen, merged_frozen)
  assert sum(jax.tree.leaves(changed)) == 8  # q, k, v, o kernels of each tower (layers stacked)
  ids = jnp.asarray(np.random.default_rng(0).integers(5, 900, (3, 2, 32)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, 1, 20:].set(0)
  soft = lambda f, t: e2llm.soft_tokens(model, f, t, ids, mask)
  gap = lambda x, y: float(jnp.max(jnp.abs(x - y)))
  np.testing.assert_allclose(soft(merged_frozen, served), soft(frozen, trainable), rtol=1e-5,
                             atol=1e-7)
  assert gap(soft(frozen, trainable), soft(frozen, engine.trainable)) > 1e-4  # the LoRA matters
  tokens = ids[:, 0, :12]
  logits = lambda f, t: llama.decoder_logits(
      model.decoder, f["decoder"], tokens,
      lora=e2llm.scaled_lora(t, "decoder_lora", model.decoder_lora))
  np.testing.assert_allclose(logits(merged_frozen, served), logits(frozen, trainable), rtol=1e-4,
                             atol=1e-4)
  assert gap(logits(frozen, trainable), logits(frozen, engine.trainable)) > 1

  # Engines merging and not merging answer alike, and a new trainable tree is merged afresh.
  config = engine.config.copy_and_resolve_references()
  config.inference.merge_lora = False
  apart = E2LLM.from_state(config, model, frozen, trainable, engine.encoder_tokenizer,
                           engine.decoder_tokenizer)
  merging = E2LLM.from_state(engine.config, model, frozen, engine.trainable,
                             engine.encoder_tokenizer, engine.decoder_tokenizer)
  question, context = "Where did box 14 go?", document(8)
  before = merging.generate(question, context, max_new_tokens=10)
  merging.trainable = trainable
  assert merging.generate(question, context, max_new_tokens=10) == apart.generate(
      question, context, max_new_tokens=10)
  np.testing.assert_allclose(merging.compress(context).soft_tokens,
                             apart.compress(context).soft_tokens, rtol=1e-5, atol=1e-7)
  assert before != merging.generate(question, context, max_new_tokens=10)

  # A bfloat16 tower keeps its LoRA apart: a merged bfloat16 kernel would lose the update's low bits.
  half = {**frozen, "decoder": jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen["decoder"])}
  half_frozen, half_served = e2llm.merge_lora(model, half, trainable)
  assert half_frozen["decoder"] is half["decoder"] and "decoder_lora" in half_served
  assert "encoder_lora" not in half_served


def test_bfloat16_engine_holds_its_kernels_packed_and_answers_as_unpacked(engine, monkeypatch):
  """A CPU engine over bfloat16 towers packs their layer-stack kernels once (`frozen_at_rest`),
  rather than in every jitted call, and answers token for token as without."""
  model = dataclasses.replace(
      engine.model, encoder=dataclasses.replace(engine.model.encoder, dtype="bfloat16"),
      decoder=dataclasses.replace(engine.model.decoder, dtype="bfloat16"))
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), engine.frozen)
  half_engine = lambda: E2LLM.from_state(engine.config, model, half, engine.trainable,
                                         engine.encoder_tokenizer, engine.decoder_tokenizer)
  packed = half_engine()
  is_packed = lambda x: isinstance(x, packing.Packed)
  stacks = [packed.frozen["encoder"]["layer"], packed.frozen["decoder"]["layers"]]
  kernels = [leaf for stack in stacks for leaf in jax.tree.leaves(stack, is_leaf=is_packed)
             if is_packed(leaf)]
  assert len(kernels) == 6 + 7 and all(k.bits.dtype == jnp.uint16 for k in kernels)
  questions = ["Where was box 28 sent?", "Which colour was box 9?"]
  contexts = [document(8), document(14, salt=2)]
  answers = packed.generate_batch(questions, packed.compress(contexts), max_new_tokens=6)
  monkeypatch.setattr(layers, "kernels_at_rest", lambda params: params)
  unpacked = half_engine()
  assert not any(map(is_packed, jax.tree.leaves(unpacked.frozen, is_leaf=is_packed)))
  assert answers == unpacked.generate_batch(questions, unpacked.compress(contexts),
                                            max_new_tokens=6)


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


def test_a_prompt_with_soft_tokens_pads_its_text_not_the_whole_prompt(engine, monkeypatch):
  question = "Where?"
  context, short = engine.compress([document(90), document(66)])
  masks = []  # the prompt mask [B, slots] of every prefill
  prefill = engine._prefill
  monkeypatch.setattr(engine, "_prefill",
                      lambda *args, **kw: masks.append(np.asarray(args[-1])) or prefill(*args, **kw))
  answer = engine.generate(question, context, max_new_tokens=6)
  engine.generate(question, short, max_new_tokens=6)
  # A text bucket as large as the decoder's window: the whole prompt in one bucket, as before.
  monkeypatch.setattr(engine_lib, "MIN_PROMPT_TEXT_BUCKET", engine.decoder_window)
  assert engine.generate(question, context, max_new_tokens=6) == answer
  text = int(masks[0][0].sum()) - context.num_soft_tokens
  # A soft bucket of 128 and a text bucket of 64, where the whole prompt's bucket is 256 ...
  assert 128 - text < context.num_soft_tokens <= 128 and text <= 64
  # ... and one where the whole prompt's bucket, 128, is the smaller and stays.
  assert 64 < short.num_soft_tokens <= 128 - text
  assert [m.shape[1] for m in masks] == [128 + 64, 128, 256]


def test_long_contexts_go_beyond_max_chunks(engine):
  text = document(300)
  context = engine.compress(text)
  assert context.num_chunks > 4 * int(engine.config.data.max_chunks)
  assert isinstance(engine.generate("Where did box 70 go?", context, max_new_tokens=4), str)
  with pytest.raises(ValueError, match="exceeds the decoder's window"):
    engine.generate_text(["word " * 2100], max_new_tokens=4)


def test_chunks_are_encoded_in_bucket_shaped_calls_that_pad_little():
  for multiple in (1, 3, 8):
    for total in range(1, 3000):
      calls = decoding.bucketed_calls(total, 32, 1024, multiple)
      assert sum(items for items, _ in calls) == total
      assert all(rows == decoding.bucket(items, 32, multiple) and items <= 1024
                 for items, rows in calls)
      padding = sum(rows for _, rows in calls) - total
      assert padding < 32 + len(calls) * (multiple - 1), (total, multiple, calls)
  assert decoding.bucketed_calls(300, 32, 1024) == [(256, 256), (44, 64)]  # not 512 rows


def test_compressing_in_several_calls_equals_one_call(engine):
  text = document(150, salt=5)
  ids = engine.examples.chunker(text).ids
  calls = decoding.bucketed_calls(len(ids), engine_lib.MIN_CHUNK_BUCKET,
                                  engine_lib.MAX_CHUNKS_PER_CALL, engine.batch_multiple)
  assert len(calls) > 1, calls  # the text is long enough to be split
  tokens = int(engine.config.data.chunk_tokens)
  padded = chunking.pad_chunks(ids, len(ids), tokens, engine.encoder_tokenizer.pad_token_id)
  frozen, trainable = e2llm.merge_lora(engine.model, engine.frozen, engine.trainable)
  one_call = e2llm.soft_tokens(engine.model, frozen, trainable, jnp.asarray(padded.ids)[:, None],
                               jnp.asarray(padded.token_mask)[:, None])
  np.testing.assert_allclose(engine.compress(text).soft_tokens,
                             np.asarray(one_call).reshape(-1, one_call.shape[-1]), rtol=1e-5,
                             atol=1e-6)


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


def stored_tensors(folder: pathlib.Path) -> dict[str, tuple[set[str], int]]:
  """Each safetensors file under `folder` (relative name) → (its tensors' dtypes, their data bytes)."""
  found = {}
  for path in sorted(folder.rglob("*.safetensors")):
    with open(path, "rb") as f:
      header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    found[str(path.relative_to(folder))] = ({t["dtype"] for t in tensors},
                                            sum(t["data_offsets"][1] - t["data_offsets"][0]
                                                for t in tensors))
  return found


def test_bfloat16_adapters_only_export_is_half_the_bytes_and_answers_alike(workdir, tmp_path):
  from e2llm_jax.hf import export  # pylint: disable=g-import-not-at-top
  wide = export.export(workdir, tmp_path / "float32", adapters_only=True)
  narrow = tmp_path / "bfloat16"
  assert export.main(["--workdir", str(workdir), "--out", str(narrow), "--adapters-only",
                      "--dtype", "bfloat16"]) == 0
  wide_files, narrow_files = stored_tensors(wide), stored_tensors(narrow)
  assert set(wide_files) == set(narrow_files) == {
      "adapter.safetensors", "peft/encoder/adapter_model.safetensors",
      "peft/decoder/adapter_model.safetensors"}
  for name, (dtypes, size) in narrow_files.items():
    assert dtypes == {"BF16"} and wide_files[name][0] == {"F32"}
    assert 2 * size == wide_files[name][1]
  # Whole files too, though the JSON headers (the same size in both) weigh a lot at this tiny size.
  file_bytes = lambda folder: sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
  assert file_bytes(narrow) < 0.6 * file_bytes(wide)
  for folder, dtype in ((wide, "float32"), (narrow, "bfloat16")):
    assert json.loads((folder / "e2llm_config.json").read_text())["trained_dtype"] == dtype

  wide_engine, narrow_engine = E2LLM.from_export(wide), E2LLM.from_export(narrow)
  # Read back as float32: the float32 export's values rounded once to bfloat16.
  rounded = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16).astype(np.float32),
                         wide_engine.trainable)
  for ours, expected in zip(jax.tree.leaves(narrow_engine.trainable), jax.tree.leaves(rounded)):
    assert ours.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours), expected)
  texts = [document(8), document(14, salt=2), document(5, salt=5)]
  questions = ["Where was box 28 sent?", "Which colour was box 9?", "What went to Quito?"]
  wide_contexts, narrow_contexts = wide_engine.compress(texts), narrow_engine.compress(texts)
  for a, b in zip(wide_contexts, narrow_contexts):
    scale = np.abs(a.soft_tokens).max()
    np.testing.assert_allclose(b.soft_tokens, a.soft_tokens, atol=2e-2 * scale, rtol=0)
  # The first token: this random 16-wide model's logits are nearly flat, so later tokens sit on
  # near-ties that bfloat16's rounding may flip (one flip changes the rest of the answer).
  answers = narrow_engine.generate_batch(questions, narrow_contexts, max_new_tokens=1)
  assert answers == wide_engine.generate_batch(questions, wide_contexts, max_new_tokens=1)
  assert all(answers)  # something to compare: no answer ended at once


def test_adapters_only_export_finds_moved_bases_through_asset_packages(workdir, tmp_path,
                                                                        monkeypatch):
  from e2llm_jax.hf import bundle, export  # pylint: disable=g-import-not-at-top
  out = export.export(workdir, tmp_path / "export", adapters_only=True)
  settings_file = out / bundle.E2LLM_CONFIG_FILE
  settings = json.loads(settings_file.read_text())
  trained_on = {t: pathlib.Path(settings["bases"][t]["path"]) for t in bundle.TOWERS}
  # This machine has the bases only as installed packages (fingerprints name files, not folders)...
  installed = tmp_path / "site-packages"
  for tower, path in trained_on.items():
    shutil.copytree(path, installed / tower)
  monkeypatch.setattr(bundle, "ASSET_BASES", {
      f"tiny_{t}": (lambda t=t: installed / t, f"tiny/{t}") for t in bundle.TOWERS})
  # ...and the export was made on another machine, whose paths do not exist here.
  for tower in bundle.TOWERS:
    settings["bases"][tower]["path"] = f"/elsewhere/{tower}"
  settings_file.write_text(json.dumps(settings))
  engine = E2LLM.from_export(out)
  assert engine.config.model.encoder.path == str(installed / "encoder")
  assert engine.config.model.decoder.path == str(installed / "decoder")

  # Installed weights that are not the ones trained on: one error naming both fingerprints.
  recorded = settings["bases"]["decoder"]["fingerprint"]
  with open(installed / "decoder" / "config.json", "a") as f:
    f.write(" ")
  changed = checkpoint.fingerprint(installed / "decoder")
  with pytest.raises(errors.WeightsError) as error:
    E2LLM.from_export(out)
  assert "/elsewhere/decoder" in str(error.value) and recorded in str(error.value)
  assert f"tiny_decoder: {changed}" in str(error.value)

  # An export whose bases were asset packages records no machine path, and checks them the same.
  monkeypatch.setattr(bundle, "ASSET_BASES", {
      f"tiny_{t}": (lambda t=t: trained_on[t], f"tiny/{t}") for t in bundle.TOWERS})
  packaged = export.export(workdir, tmp_path / "packaged", adapters_only=True)
  stored = (packaged / bundle.E2LLM_CONFIG_FILE).read_text()
  assert str(trained_on["decoder"]) not in stored and '"asset": "tiny_decoder"' in stored
  monkeypatch.setattr(bundle, "ASSET_BASES", {
      f"tiny_{t}": (lambda t=t: installed / t, f"tiny/{t}") for t in bundle.TOWERS})
  with pytest.raises(errors.WeightsError) as error:
    bundle.load_export(packaged)
  assert recorded in str(error.value) and changed in str(error.value)
  assert "tiny_decoder asset package" in str(error.value)


def test_showcase_cli_on_an_export_prints_table_and_worked_example(workdir, tmp_path):
  from e2llm_jax.hf import export  # pylint: disable=g-import-not-at-top
  out = export.export(workdir, tmp_path / "export", adapters_only=True, dtype="bfloat16")
  result = subprocess.run(
      [sys.executable, "-m", "e2llm_jax.evaluation.showcase", "--export", str(out), "--tasks",
       "niah_single_1", "--lengths", "512", "--num-samples", "2", "--baselines", "none,full",
       "--out", str(tmp_path / "shown")],
      capture_output=True, text=True, cwd=ROOT, timeout=600,
      env={**__import__("os").environ, "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert "| task | length | e2llm | none | full | e2llm compression |" in lines
  (row,) = [line for line in lines if line.startswith("| niah_single_1 | 512 |")]
  assert float(row.split("|")[-2].strip().rstrip("x")) > 1  # soft tokens fewer than text tokens
  assert any(line.startswith("Worked example (niah_single_1, 512 tokens") for line in lines)
  assert any(line.startswith("  needle:   One of the special magic numbers for ") for line in lines)
  assert sum(line.startswith(("  e2llm (", "  none (", "  full (")) for line in lines) == 3
  saved = json.loads((tmp_path / "shown" / "results.json").read_text())
  assert saved["seed"] == saved["run_seed"] + 1 and len(saved["rows"]) == 3


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
