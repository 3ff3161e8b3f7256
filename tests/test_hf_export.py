"""Export to Hugging Face: merged towers and PEFT adapters against transformers/peft, E2LLM via remote code.

One run trains tiny random towers that speak real tokenizers (MiniLM's, SmolLM2's GGUF one) a few steps.
"""

import json
import logging
import pathlib
import shutil

import huggingface_hub
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from configs import tiny
from e2llm_jax import assets, checkpoint, errors, hf, sharding
from e2llm_jax.data import chunking, tasks
from e2llm_jax.hf import bundle, export as export_lib, modeling_e2llm
from e2llm_jax.hf import gguf as hf_gguf
from e2llm_jax.hf.peft_adapters import PEFT_WEIGHTS_FILE
from e2llm_jax.inference import E2LLM, loading
from e2llm_jax.models import bert, e2llm, llama, lora
from e2llm_jax.training import loop, state as state_lib
from test_hf_import import saved_tensors, write_gguf

TOLERANCE = 1e-4
FILLER = ("The archive keeps letters from many decades. Some are short notes about the weather. "
          "Others describe long journeys across the mountains!\nA few mention the old mill by the "
          "river, where the miller counted sacks each morning. ")
QUESTIONS = [("The passkey is 48213. Keep it safe.", "What is the passkey?"),
             ("Anna moved to Lisbon in 1998 to study the tides.", "Where did Anna move?"),
             ("The blue key opens the cellar door.", "Which key opens the cellar?"),
             ("Our train leaves at seven, platform nine.", "When does the train leave?"),
             ("The recipe needs three eggs and a cup of flour.", "How many eggs are needed?")]
NUMBERS = ("Invoice 4821937 was paid on 2024-03-15: 1250.75 euros. Crates 17 to 96 sit in room "
           "3041.\nCall 555-0199 before 08:30! ")


def long_context(index: int) -> str:
  needle = QUESTIONS[index][0]
  return FILLER * (2 + index % 2) + needle + " " + FILLER * (1 + index % 3)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """Tiny random BERT with MiniLM's vocabulary and tokenizer; tiny Llama GGUF with SmolLM2's."""
  root = tmp_path_factory.mktemp("bases")
  encoder_dir = root / "encoder"
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(
      vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128), add_pooling_layer=False).save_pretrained(encoder_dir)
  for file in assets.minilm_dir().iterdir():
    if "token" in file.name or file.name == "vocab.txt":
      shutil.copy(file, encoder_dir / file.name)
  torch.manual_seed(1)
  decoder_hf = root / "decoder_hf"
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
      eos_token_id=2, rms_norm_eps=1e-5)).save_pretrained(decoder_hf)
  cfg, _ = hf.load_decoder(decoder_hf)
  reader = hf_gguf.gguf_reader(assets.smollm2_gguf())
  meta = lambda key: hf_gguf.gguf_metadata(reader, f"tokenizer.{key}")
  decoder_gguf = root / "decoder.gguf"
  write_gguf(decoder_gguf, cfg, saved_tensors(decoder_hf), tokens=meta("ggml.tokens"),
             merges=meta("ggml.merges"), token_types=meta("ggml.token_type"),
             chat_template=meta("chat_template"))
  return {"encoder": encoder_dir, "decoder": decoder_gguf, "decoder_hf": decoder_hf}


def train_tiny(bases, workdir, pooling="pma", split_digits=False, steps=3):
  """The tiny config on those bases, trained a few steps at a high rate so LoRA B is far from 0.

  Pooling `tokens` makes every position of a chunk a soft token (tokens_per_chunk = chunk_tokens).
  """
  config = tiny.get_config()
  for tower in ("encoder", "decoder"):
    config.model[tower].path = str(bases[tower])
    config.model[tower].random_init = None
  config.train.steps = steps
  config.train.log_every = 1
  config.train.eval_examples = 0
  config.ckpt.async_save = False
  config.optim.lr = 1e-2
  config.optim.warmup_steps = 0
  config.data.update(chunk_tokens=32, max_chunks=8, prefix_tokens=64, query_tokens=48,
                     target_tokens=12, encoder_split_digits=split_digits)
  if pooling == "tokens":
    config.model.update(pooling="tokens", tokens_per_chunk=config.data.chunk_tokens)
  loop.train(config, str(workdir))
  return {"config": config, "workdir": workdir,
          "restored": export_lib.restore_for_export(workdir)}


@pytest.fixture(scope="module")
def run(bases, tmp_path_factory):
  return train_tiny(bases, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def tokens_export(bases, tmp_path_factory):
  """A full export of a run with pooling `tokens` whose encoder sees one token per digit."""
  # One step: after three this random decoder answers every question with an end of sequence
  # first, and empty answers would compare nothing.
  tokens_run = train_tiny(bases, tmp_path_factory.mktemp("tokens_run"), pooling="tokens",
                          split_digits=True, steps=1)
  return export_lib.export(tokens_run["workdir"],
                           tmp_path_factory.mktemp("tokens_parent") / "export")


@pytest.fixture(scope="module")
def full_export(run, tmp_path_factory):
  out = tmp_path_factory.mktemp("full_parent") / "export"
  export_lib.export(run["workdir"], out)
  return out


@pytest.fixture(scope="module")
def adapters_export(run, tmp_path_factory):
  """Through the command line's `main` (argument wiring included)."""
  out = tmp_path_factory.mktemp("adapters_parent") / "export"
  assert export_lib.main(["--workdir", str(run["workdir"]), "--out", str(out),
                          "--adapters-only"]) == 0
  return out


@pytest.fixture(scope="module")
def bf16_adapters_export(run, tmp_path_factory):
  out = tmp_path_factory.mktemp("bf16_parent") / "export"
  export_lib.export(run["workdir"], out, adapters_only=True, dtype="bfloat16")
  return out


@pytest.fixture(scope="module")
def jax_model(adapters_export):
  """Bases + LoRA + head as JAX reads them back from the adapters-only export."""
  return bundle.load_export(adapters_export)


def test_everything_loads_offline():
  assert huggingface_hub.constants.HF_HUB_OFFLINE  # set before any import (conftest)


def test_layout_and_settings(full_export, adapters_export, run, bases):
  for folder in ("decoder", "encoder"):
    names = {p.name for p in (full_export / folder).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
  assert (full_export / "decoder" / "generation_config.json").is_file()
  assert (full_export / "decoder" / "config.json").read_text().count('"rope_parameters"') == 1
  for tower in ("encoder", "decoder"):
    adapter_config = json.loads((full_export / "peft" / tower / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(bases[tower])
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0
  root_config = json.loads((full_export / "config.json").read_text())
  assert root_config["auto_map"]["AutoModel"] == "modeling_e2llm.E2LLMModel"
  settings = json.loads((full_export / "e2llm_config.json").read_text())
  assert settings["kind"] == "full" and settings["step"] == 3
  for tower in ("encoder", "decoder"):
    assert settings["bases"][tower]["fingerprint"] == checkpoint.fingerprint(bases[tower])
  assert settings["data"]["chunk_tokens"] == 32
  assert settings["data"]["templates"]["qa"]["text"] == tasks.PROMPT_TEMPLATES["qa"].text
  # Nothing written beside OUT; the adapters-only export holds no towers.
  assert [p.name for p in full_export.parent.iterdir()] == ["export"]
  assert sorted(p.name for p in adapters_export.iterdir()) == [
      "adapter.safetensors", "e2llm_config.json", "peft"]


def test_a_relative_workdir_exports_without_warnings(run, tmp_path, monkeypatch, caplog):
  # Orbax reads only absolute paths; `--workdir=workdirs/demo` is what users type.
  monkeypatch.chdir(run["workdir"].parent)
  with caplog.at_level(logging.WARNING):
    out = export_lib.export(pathlib.Path(run["workdir"].name), tmp_path / "export",
                            adapters_only=True)
  assert (pathlib.Path(out) / bundle.ADAPTER_FILE).is_file()
  # Orbax's checkpointer, asked for one item's metadata, warns of a missing step metadata file.
  assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []


def test_adapters_only_export_loads_back_exactly(jax_model, run, bases):
  config, model, frozen, trainable = jax_model
  restored = run["restored"]["trainable"]
  assert jax.tree.structure(trainable) == jax.tree.structure(restored)
  jax.tree.map(np.testing.assert_array_equal, trainable, restored)
  _, base_decoder = hf.load_decoder(bases["decoder"])
  jax.tree.map(np.testing.assert_array_equal, frozen["decoder"], base_decoder)
  assert model.decoder_lora.scale == 2.0 and model.pooling == "pma"
  assert config["model"]["decoder"]["path"] == str(bases["decoder"])
  # LoRA B really moved away from zero, so every comparison below sees the adapters.
  assert np.abs(trainable["decoder_lora"]["layers"]["self_attn"]["q_proj"]["b"][0]).max() > 1e-3


def test_a_new_run_starts_from_an_adapters_only_export(bf16_adapters_export, full_export, run,
                                                       tmp_path):
  # The next stage of a curriculum from a shipped export: its trained tensors, fresh optimizer.
  config = run["config"].copy_and_resolve_references()
  config.train.init_from = str(bf16_adapters_export)
  setup = state_lib.create_train_state(config, sharding.make_mesh((1, 1, 1), config.mesh.axes))
  assert loop.init_trainable_from(config.train.init_from, setup) == 3
  _, _, _, exported = bundle.load_export(bf16_adapters_export)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(setup.state["trainable"]), exported)
  assert int(setup.state["step"]) == 0
  loop.train(config, str(tmp_path / "next"))
  assert (tmp_path / "next" / "checkpoints" / "3").is_dir()

  with pytest.raises(errors.ConfigError, match="full export"):
    loop.init_trainable_from(str(full_export), setup)
  other = run["config"].copy_and_resolve_references()
  other.model.adapter_hidden = 24
  other_setup = state_lib.create_train_state(other, sharding.make_mesh((1, 1, 1), other.mesh.axes))
  with pytest.raises(errors.ConfigError, match="do not fit this config"):
    loop.init_trainable_from(str(bf16_adapters_export), other_setup)


def test_full_export_loads_back_as_merged_towers(full_export, jax_model):
  config, model, frozen, trainable = bundle.load_export(full_export)
  assert model.encoder_lora is None and model.decoder_lora is None
  assert config["lora"]["decoder_rank"] == 0
  assert set(trainable) == {"pooling", "adapter"}
  _, lora_model, lora_frozen, lora_trainable = jax_model
  merged = lora.merge(lora_frozen["decoder"], lora_trainable["decoder_lora"],
                      lora_model.decoder_lora.scale)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), frozen["decoder"],
               jax.tree.map(np.asarray, merged))


def test_exported_decoder_logits_match_jax(full_export, jax_model):
  _, model, frozen, trainable = jax_model
  embeds = np.random.default_rng(0).normal(size=(2, 12, 64)).astype(np.float32)
  mask = np.ones((2, 12), np.int32)
  ours = llama.decoder_logits(model.decoder, frozen["decoder"], inputs_embeds=embeds,
                              attention_mask=mask,
                              lora=lora.scaled(trainable["decoder_lora"], model.decoder_lora.scale))
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(full_export / "decoder").eval()
  with torch.no_grad():
    theirs = torch_model(inputs_embeds=torch.from_numpy(embeds)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOLERANCE, rtol=0)


def test_exported_encoder_hidden_states_match_jax(full_export, jax_model):
  _, model, frozen, trainable = jax_model
  ids = np.random.default_rng(1).integers(0, 30522, size=(2, 10)).astype(np.int32)
  mask = np.array([[1] * 10, [1] * 6 + [0] * 4], np.int32)
  ours = bert.encode(model.encoder, frozen["encoder"], ids, mask,
                     lora=lora.scaled(trainable["encoder_lora"], model.encoder_lora.scale))
  torch_model = transformers.BertModel.from_pretrained(full_export / "encoder",
                                                       add_pooling_layer=False).eval()
  with torch.no_grad():
    theirs = torch_model(input_ids=torch.from_numpy(ids).long(),
                         attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=TOLERANCE, rtol=0)


def _torch_tower(tower, bases):
  """(loader, base folder, inputs, output getter) of one tower in transformers."""
  if tower == "decoder":
    return (transformers.AutoModelForCausalLM.from_pretrained, bases["decoder_hf"],
            {"input_ids": torch.arange(3, 40)[None]}, lambda result: result.logits)
  return (lambda path: transformers.BertModel.from_pretrained(path, add_pooling_layer=False),
          bases["encoder"], {"input_ids": torch.arange(101, 140)[None]},
          lambda result: result.last_hidden_state)


@pytest.mark.parametrize("tower", ["decoder", "encoder"])
def test_peft_adapters_on_the_base_equal_the_merged_tower(tower, full_export, bases):
  load, base_folder, inputs, output = _torch_tower(tower, bases)
  adapter_dir = full_export / "peft" / tower
  with_adapter = peft.PeftModel.from_pretrained(load(base_folder), adapter_dir).eval()
  # Our tensor names are exactly the ones peft itself gives these modules.
  fresh = peft.get_peft_model(load(base_folder), peft.LoraConfig.from_pretrained(adapter_dir))
  assert set(peft.get_peft_model_state_dict(fresh)) == set(load_file(adapter_dir /
                                                                     PEFT_WEIGHTS_FILE))
  merged = load(full_export / tower).eval()
  with torch.no_grad():
    merged_out = output(merged(**inputs)).numpy()
    np.testing.assert_allclose(output(with_adapter(**inputs)).numpy(), merged_out,
                               atol=TOLERANCE, rtol=0)
    base_only = output(load(base_folder).eval()(**inputs)).numpy()
  assert np.abs(base_only - merged_out).max() > 10 * TOLERANCE  # the adapters change the tower


@pytest.mark.parametrize("tower", ["decoder", "encoder"])
def test_bf16_peft_adapters_load_in_peft_close_to_the_merged_tower(tower, bf16_adapters_export,
                                                                   full_export, bases):
  load, base_folder, inputs, output = _torch_tower(tower, bases)
  adapter_dir = bf16_adapters_export / "peft" / tower
  assert {str(t.dtype) for t in load_file(adapter_dir / PEFT_WEIGHTS_FILE).values()} == {"bfloat16"}
  with_adapter = peft.PeftModel.from_pretrained(load(base_folder), adapter_dir).eval()
  with torch.no_grad():
    ours = output(with_adapter(**inputs)).float().numpy()
    merged = output(load(full_export / tower).eval()(**inputs)).numpy()
    base_only = output(load(base_folder).eval()(**inputs)).numpy()
  # bfloat16 keeps 8 bits of each LoRA factor: the adapters' effect survives to within a few %.
  assert np.abs(ours - merged).max() < 0.05 * np.abs(base_only - merged).max()


@pytest.mark.parametrize("tower", ["decoder", "encoder"])
def test_hf_import_export_round_trip_is_bit_identical(tower, bases, tmp_path):
  source = bases["decoder_hf" if tower == "decoder" else "encoder"]
  cfg, params = (hf.load_decoder if tower == "decoder" else hf.load_encoder)(source)
  read = export_lib.params_reader(export_lib.WEIGHT_MAPS[tower](cfg), params)
  # A small shard size, so the index and several shards are written and read back too.
  export_lib.write_tower(tmp_path, tower, cfg, read, max_shard_bytes=1 << 20)
  assert (tmp_path / "model.safetensors.index.json").is_file()
  original, written = saved_tensors(source), saved_tensors(tmp_path)
  assert set(written) == set(original) - {"lm_head.weight"}  # tied: one table
  for name, tensor in written.items():
    assert tensor.dtype == original[name].dtype and tensor.tobytes() == original[name].tobytes()
  reader = hf.decoder_config_from_hf if tower == "decoder" else hf.encoder_config_from_hf
  assert reader(json.loads((tmp_path / "config.json").read_text())) == cfg
  model_class = transformers.AutoModelForCausalLM if tower == "decoder" else transformers.AutoModel
  reloaded = model_class.from_pretrained(tmp_path)
  assert reloaded.get_input_embeddings().weight.detach().numpy().tobytes() == original[
      "model.embed_tokens.weight" if tower == "decoder" else
      "embeddings.word_embeddings.weight"].tobytes()


def test_gguf_tokenizer_is_written_as_hf_files(full_export, bases):
  exported = transformers.AutoTokenizer.from_pretrained(full_export / "decoder")
  original = hf.load_tokenizer(bases["decoder"])
  messages = [{"role": "user", "content": "Hi there"}]
  for text in ["Hello world! 123", "<|im_start|>user\nhi<|im_end|>", "  ünïcödé\n\ttab"]:
    assert exported(text)["input_ids"] == original(text)["input_ids"]
  assert (exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
          == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
  assert exported.eos_token_id == original.eos_token_id == 2


def test_remote_code_repeats_our_chunking_and_prompt_rules(full_export):
  assert modeling_e2llm.SENTENCE_END_CHARACTERS == chunking.SENTENCE_END_CHARACTERS
  assert modeling_e2llm.CLOSING_CHARACTERS == chunking.CLOSING_CHARACTERS
  assert modeling_e2llm.CHAT_SENTINEL == tasks.CHAT_SENTINEL
  tokenizer = transformers.AutoTokenizer.from_pretrained(full_export / "encoder")
  for overlap, split_digits in ((0, False), (5, False), (0, True), (5, True)):
    chunker = chunking.Chunker(tokenizer, 32, overlap, split_digits)
    for text in [long_context(i) for i in range(len(QUESTIONS))] + [NUMBERS * 4]:
      assert modeling_e2llm.chunk_ids(tokenizer, text, 32, overlap,
                                      split_digits) == chunker(text).ids


def check_remote_greedy_answers(export, jax_model, split_digits=False):
  """The PyTorch model of a full export answers as e2llm.generate does, token for token."""
  _, model, frozen, trainable = jax_model
  remote = transformers.AutoModel.from_pretrained(export, trust_remote_code=True)
  max_new = 12
  sizes = tasks.ExampleSizes(chunk_tokens=32, max_chunks=12, prefix_tokens=64, query_tokens=48,
                             target_tokens=1, recon_window=1)
  examples = tasks.ExampleEncoder(hf.load_tokenizer(export / "encoder"),
                                  hf.load_tokenizer(export / "decoder"), sizes,
                                  split_digits=split_digits)
  rows = [examples.instruction(long_context(i), question, "")
          for i, (_, question) in enumerate(QUESTIONS)]
  assert all(row["chunks_dropped"] == 0 and row["prompt_tokens_dropped"] == 0 for row in rows)
  assert min(int(row["chunk_mask"].sum()) for row in rows) >= 6  # long contexts: many chunks
  batch = {key: np.stack([row[key] for row in rows]) for key in e2llm.BATCH_KEYS}
  eos = examples.eos_id
  generated = np.asarray(jax.jit(lambda t, f, b: e2llm.generate(model, f, t, b, max_new, eos))(
      trainable, frozen, batch))
  answers = []
  for row, (index, (_, question)) in zip(generated, enumerate(QUESTIONS)):
    ours = list(row[:list(row).index(eos)] if eos in row else row)
    theirs = remote.generate(question, long_context(index), max_new_tokens=max_new,
                             return_ids=True)
    assert theirs == ours
    answers.append(ours)
  assert any(answers)  # something was generated before an end of sequence
  text = remote.generate(QUESTIONS[0][1], long_context(0), max_new_tokens=max_new)
  assert text == examples.decoder_tokenizer.decode(answers[0], skip_special_tokens=True)


def test_remote_code_e2llm_gives_the_jax_greedy_answers(full_export, jax_model):
  check_remote_greedy_answers(full_export, jax_model)


def test_remote_code_with_token_pooling_and_split_digits_gives_the_jax_greedy_answers(
    tokens_export):
  check_remote_greedy_answers(tokens_export, bundle.load_export(tokens_export), split_digits=True)


def test_remote_code_compresses_to_the_jax_engines_text_token_slots(tokens_export):
  engine = E2LLM.from_export(tokens_export)
  remote = transformers.AutoModel.from_pretrained(tokens_export, trust_remote_code=True)
  text = NUMBERS * 3 + long_context(1)
  context = engine.compress(text)
  chunks = modeling_e2llm.chunk_ids(remote.encoder_tokenizer, text, 32, 0, split_digits=True)
  text_tokens = sum(len(ids) - 2 for ids in chunks)  # no [CLS] nor [SEP]
  unsplit = modeling_e2llm.chunk_ids(remote.encoder_tokenizer, text, 32, 0)
  assert len(context.chunk_texts) == len(chunks) > 4
  assert text_tokens > sum(len(ids) - 2 for ids in unsplit)  # the digits were split
  assert context.visible_soft_tokens.shape[0] == text_tokens
  np.testing.assert_allclose(remote.compress(text).numpy(), context.visible_soft_tokens,
                             rtol=TOLERANCE, atol=TOLERANCE)


def test_token_pooling_and_split_digits_round_trip_through_the_export(tokens_export, tmp_path):
  settings = json.loads((tokens_export / "e2llm_config.json").read_text())
  assert settings["model"]["pooling"] == "tokens" and settings["model"]["tokens_per_chunk"] == 32
  assert settings["data"]["encoder_split_digits"] is True
  config, model, _, trainable = bundle.load_export(tokens_export)
  assert model.pooling == "tokens" and model.tokens_per_chunk == 32
  assert set(trainable) == {"adapter"}  # no pooling head to carry
  assert loading.config_from_json(config).data.encoder_split_digits is True
  # An export from before the setting has it nowhere: both sides read it as False.
  old = tmp_path / "old"
  old.mkdir()
  for item in tokens_export.iterdir():
    (old / item.name).symlink_to(item)
  for section in (settings["data"], settings["config"]["data"]):
    del section["encoder_split_digits"]
  (old / "e2llm_config.json").unlink()
  (old / "e2llm_config.json").write_text(json.dumps(settings))
  assert loading.config_from_json(bundle.load_export(old)[0]).data.encoder_split_digits is False
  remote = transformers.AutoModel.from_pretrained(old, trust_remote_code=True)
  unsplit = modeling_e2llm.chunk_ids(remote.encoder_tokenizer, NUMBERS, 32, 0)
  assert remote.compress(NUMBERS).shape[0] == sum(len(ids) - 2 for ids in unsplit)


def test_adapters_on_a_different_base_fail_naming_both_fingerprints(adapters_export, bases):
  expected = checkpoint.fingerprint(bases["decoder"])
  other = checkpoint.fingerprint(bases["decoder_hf"])
  with pytest.raises(ValueError) as error:
    bundle.load_export(adapters_export, decoder_path=bases["decoder_hf"])
  assert expected in str(error.value) and other in str(error.value)


def test_non_empty_out_needs_overwrite(adapters_export, run):
  before = (adapters_export / "e2llm_config.json").read_text()
  with pytest.raises(ValueError, match="--overwrite"):
    export_lib.export(run["workdir"], adapters_export, adapters_only=True)
  assert (adapters_export / "e2llm_config.json").read_text() == before
  export_lib.export(run["workdir"], adapters_export, adapters_only=True, overwrite=True)
  assert sorted(p.name for p in adapters_export.parent.iterdir()) == ["export"]


def test_interrupted_export_leaves_no_folder_that_looks_complete(run, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise RuntimeError("disk full")

  out = tmp_path / "export"
  monkeypatch.setattr(export_lib, "write_peft_adapter", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    export_lib.export(run["workdir"], out, adapters_only=True)
  assert list(tmp_path.iterdir()) == []
  # A replacement that fails keeps the export that was there.
  monkeypatch.undo()
  export_lib.export(run["workdir"], out, adapters_only=True)
  monkeypatch.setattr(export_lib, "write_peft_adapter", fail)
  with pytest.raises(RuntimeError):
    export_lib.export(run["workdir"], out, adapters_only=True, overwrite=True)
  assert [p.name for p in tmp_path.iterdir()] == ["export"]
  bundle.load_export(out)
  # A process killed mid-write leaves only the hidden partial folder, which is no export.
  partial = tmp_path / ".export.partial-killed"
  shutil.copytree(out, partial)
  (partial / "e2llm_config.json").unlink()
  with pytest.raises(FileNotFoundError, match="not a complete E2LLM export"):
    bundle.load_export(partial)


def test_asset_bases_are_recorded_without_machine_paths(tmp_path):
  path = assets.minilm_dir()
  record = bundle.base_record(str(path), checkpoint.fingerprint(path))
  assert record["asset"] == "minilm" and record["path"] is None
  assert record["hf_name"] == "sentence-transformers/all-MiniLM-L6-v2"
  assert bundle.find_base(tmp_path, "encoder", record) == path
