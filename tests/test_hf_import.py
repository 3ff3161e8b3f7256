"""Import of HF folders and GGUF files: name maps, config formats, round trips, sharding, errors.

Tiny random transformers models are built and saved inside each test; nothing is downloaded.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from e2llm_jax import hf
from e2llm_jax.hf import tokenizers as hf_tokenizers
from e2llm_jax.hf import weight_names
from e2llm_jax.models import bert, llama, stacking

TINY_DECODER = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
TINY_ENCODER = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64)
DECODER_VARIANTS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama_tied_biases": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True,
                              mlp_bias=True, head_dim=16),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "mistral_window": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=16),
}


def save_causal_lm(folder: pathlib.Path, seed: int = 0, dtype=torch.float32, **overrides):
  """A random tiny causal LM saved with save_pretrained; returns the torch model."""
  config = transformers.AutoConfig.for_model(**{**TINY_DECODER, **overrides})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
  # Random biases: zero-initialised ones would not catch a bias mapped to the wrong place.
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        tensor.normal_()
  model.save_pretrained(folder)
  return model


def save_encoder(folder: pathlib.Path, model_class=transformers.BertModel, seed: int = 0):
  torch.manual_seed(seed)
  model = model_class(transformers.BertConfig(**TINY_ENCODER)).eval()
  model.save_pretrained(folder)
  return model


def saved_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  tensors = {}
  for file in sorted(folder.glob("*.safetensors")):
    tensors.update(load_file(file))
  return tensors


def rewrite_tensors(folder: pathlib.Path, edit) -> None:
  """Load model.safetensors, let `edit` change the dict, and save it back in place."""
  path = folder / "model.safetensors"
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def shapes_of_init(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Per-layer paths and shapes of a fresh tree; a scanned tower's is stacked, then split per layer
  (so both layouts hold what the weight map names)."""
  init = bert.init_params if isinstance(cfg, bert.EncoderConfig) else llama.init_params
  abstract = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
  if cfg.scan_layers:
    stacked = traverse_util.flatten_dict(abstract)
    assert all(leaf.shape[0] == cfg.num_layers for path, leaf in stacked.items()
               if path[0] == stacking.DECODER_LAYERS or path[0] == stacking.ENCODER_LAYERS)
    abstract = stacking.per_layer(jax.tree.map(lambda x: np.zeros(x.shape, np.int8), abstract))
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama")
  save_causal_lm(folder, attention_bias=True)
  return folder


# ----------------------------------------------------------------------------------------------
# Name maps and round trips.


@pytest.mark.parametrize("variant", sorted(DECODER_VARIANTS))
def test_decoder_weight_map_matches_the_model_tree(variant):
  hf_config = transformers.AutoConfig.for_model(**{**TINY_DECODER, **DECODER_VARIANTS[variant]})
  cfg = hf.decoder_config_from_hf(hf_config.to_dict())
  mapped = {spec.path: spec.shape for spec in weight_names.decoder_weight_map(cfg).values()}
  assert mapped == shapes_of_init(cfg) == shapes_of_init(dataclasses.replace(cfg, scan_layers=False))


def test_encoder_weight_map_matches_the_model_tree():
  cfg = hf.encoder_config_from_hf(transformers.BertConfig(**TINY_ENCODER).to_dict())
  mapped = {spec.path: spec.shape for spec in weight_names.encoder_weight_map(cfg).values()}
  assert mapped == shapes_of_init(cfg) == shapes_of_init(dataclasses.replace(cfg, scan_layers=False))


@pytest.mark.parametrize("variant", sorted(DECODER_VARIANTS))
def test_decoder_round_trip_gives_back_the_saved_tensors(variant, tmp_path):
  model = save_causal_lm(tmp_path, **DECODER_VARIANTS[variant])
  cfg, params = hf.load_decoder(tmp_path)
  original = saved_tensors(tmp_path)
  exported = hf.to_hf_state_dict(cfg, params)
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
  assert {a.dtype for a in exported.values()} == {np.dtype(np.float32)}
  # The config survives HF → ours → HF → transformers → ours.
  rebuilt = transformers.AutoConfig.for_model(**hf.decoder_config_to_hf(cfg))
  assert hf.decoder_config_from_hf(rebuilt.to_dict()) == cfg
  assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
  assert cfg.model_type == model.config.model_type


def test_decoder_config_flags_follow_the_model_type(tmp_path):
  cfgs = {}
  for variant, overrides in DECODER_VARIANTS.items():
    folder = tmp_path / variant
    save_causal_lm(folder, **overrides)
    cfgs[variant] = hf.load_decoder(folder)[0]
  assert (cfgs["llama"].qkv_bias, cfgs["llama"].o_bias) == (False, False)
  assert (cfgs["llama_tied_biases"].qkv_bias, cfgs["llama_tied_biases"].o_bias,
          cfgs["llama_tied_biases"].mlp_bias) == (True, True, True)
  assert cfgs["llama_tied_biases"].head_dim == 16
  assert (cfgs["qwen2"].qkv_bias, cfgs["qwen2"].o_bias) == (True, False)
  assert cfgs["qwen2"].sliding_window is None
  assert cfgs["mistral_window"].sliding_window == 16
  assert cfgs["llama"].sliding_window is None


def test_tiny_llama_logits_match_torch(llama_folder):
  cfg, params = hf.load_decoder(llama_folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
  with torch.no_grad():
    expected = model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(llama.decoder_logits(cfg, params, input_ids=jnp.asarray(ids)))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_class", [transformers.BertModel, transformers.BertForMaskedLM])
def test_encoder_round_trip_skips_pooler_heads_and_buffers(model_class, tmp_path):
  model = save_encoder(tmp_path, model_class)
  cfg, params = hf.load_encoder(tmp_path)
  body = model if model_class is transformers.BertModel else model.bert
  expected = {name: tensor.numpy() for name, tensor in body.state_dict().items()
              if not name.startswith("pooler.") and name != "embeddings.position_ids"}
  exported = hf.to_hf_state_dict(cfg, params)
  assert sorted(exported) == sorted(expected)
  for name, tensor in expected.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
  rebuilt = transformers.AutoConfig.for_model(**hf.encoder_config_to_hf(cfg))
  assert hf.encoder_config_from_hf(rebuilt.to_dict()) == cfg


def test_encoder_reads_bare_checkpoints_with_old_layer_norm_names(tmp_path):
  save_encoder(tmp_path)
  reference_cfg, reference = hf.load_encoder(tmp_path)

  def to_gamma_beta(tensors):
    for name in [n for n in tensors if "LayerNorm." in n]:
      suffix = {"weight": "gamma", "bias": "beta"}[name.rsplit(".", 1)[1]]
      tensors[name.rsplit(".", 1)[0] + "." + suffix] = tensors.pop(name)

  rewrite_tensors(tmp_path, to_gamma_beta)
  cfg, params = hf.load_encoder(tmp_path)
  assert cfg == reference_cfg
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_sharded_checkpoint_loads_like_a_single_file(llama_folder, tmp_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  cfg, params = hf.load_decoder(tmp_path)
  single_cfg, single = hf.load_decoder(llama_folder)
  assert cfg == single_cfg
  jax.tree.map(np.testing.assert_array_equal, params, single)


def test_bfloat16_checkpoint_loads_as_float32_or_as_asked(tmp_path):
  model = save_causal_lm(tmp_path, dtype=torch.bfloat16)
  cfg, params = hf.load_decoder(tmp_path)
  q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
  assert params["layers"]["self_attn"]["q_proj"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(params["layers"]["self_attn"]["q_proj"]["kernel"][0], q_proj.T)
  _, bf16_params = hf.load_decoder(tmp_path, dtype="bfloat16")
  leaves = jax.tree.leaves(bf16_params)
  assert {leaf.dtype for leaf in leaves} == {np.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(
      bf16_params["layers"]["self_attn"]["q_proj"]["kernel"][0].astype(np.float32), q_proj.T)


# ----------------------------------------------------------------------------------------------
# Config formats.

OLD_LLAMA3 = {
    "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 5, "eos_token_id": [6, 7, 8], "tie_word_embeddings": False,
}
OLD_LINEAR = {
    "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 10000.0,
    "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "float16",
}
OLD_DEFAULT_QWEN2 = {
    "model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rope_theta": 1000000.0, "rope_scaling": None, "use_sliding_window": False,
    "sliding_window": 32, "max_window_layers": 2, "torch_dtype": "bfloat16",
    "tie_word_embeddings": True, "eos_token_id": 9,
}


@pytest.mark.parametrize("old", [OLD_LLAMA3, OLD_LINEAR, OLD_DEFAULT_QWEN2],
                         ids=["llama3", "linear", "qwen2_default"])
def test_old_and_transformers5_config_formats_agree(old):
  # transformers 5 itself rewrites the old format into the new one (rope_parameters, dtype).
  new = transformers.AutoConfig.for_model(**old).to_dict()
  assert "rope_parameters" in new and new.get("rope_scaling") is None
  assert hf.decoder_config_from_hf(old) == hf.decoder_config_from_hf(new)


def test_rope_settings_and_special_ids_are_read():
  cfg = hf.decoder_config_from_hf(OLD_LLAMA3)
  assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0
  assert cfg.rope_params == (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                             ("original_max_position_embeddings", 8192.0))
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (5, 6, None)
  linear = hf.decoder_config_from_hf(OLD_LINEAR)
  assert (linear.rope_type, linear.rope_params, linear.num_kv_heads) == ("linear",
                                                                         (("factor", 2.0),), 4)
  assert hf.decoder_config_from_hf(OLD_DEFAULT_QWEN2).rope_params == ()
  # Export writes the transformers-5 form and transformers reads it back unchanged.
  hf_config = hf.decoder_config_to_hf(cfg)
  assert hf_config["rope_parameters"]["original_max_position_embeddings"] == 8192
  assert "rope_scaling" not in hf_config and "torch_dtype" not in hf_config


def test_qwen2_sliding_window_only_when_every_layer_slides():
  everywhere = {**OLD_DEFAULT_QWEN2, "use_sliding_window": True, "max_window_layers": 0}
  assert hf.decoder_config_from_hf(everywhere).sliding_window == 32
  new = transformers.AutoConfig.for_model(**everywhere).to_dict()
  assert hf.decoder_config_from_hf(new).sliding_window == 32
  partial = {**OLD_DEFAULT_QWEN2, "use_sliding_window": True, "max_window_layers": 2}
  with pytest.raises(ValueError, match="only some layers"):
    hf.decoder_config_from_hf(partial)


def test_config_to_hf_refuses_what_the_model_type_cannot_express():
  cfg = hf.decoder_config_from_hf(OLD_LINEAR)
  with pytest.raises(ValueError, match="o_bias"):
    hf.decoder_config_to_hf(dataclasses.replace(cfg, qkv_bias=True))
  with pytest.raises(ValueError, match="Qwen2 has exactly q/k/v biases"):
    hf.decoder_config_to_hf(dataclasses.replace(cfg, model_type="qwen2"))


# ----------------------------------------------------------------------------------------------
# Errors a user can cause.


def test_missing_unexpected_and_misshaped_tensors_are_listed_in_one_error(tmp_path):
  save_causal_lm(tmp_path)

  def break_it(tensors):
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.norm.weight"] = np.zeros((31,), np.float32)

  rewrite_tensors(tmp_path, break_it)
  with pytest.raises(ValueError) as error:
    hf.load_decoder(tmp_path)
  message = str(error.value)
  assert str(tmp_path) in message
  assert "missing (1): model.layers.1.mlp.up_proj.weight" in message
  assert "unexpected (1): model.layers.0.self_attn.extra.weight" in message
  assert "mis-shaped (1): model.norm.weight (31,) (expected (32,))" in message


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_each_tensor_problem_names_the_tensor(problem, tmp_path):
  save_encoder(tmp_path)
  name = "encoder.layer.0.attention.self.key.weight"

  def break_it(tensors):
    if problem == "missing":
      del tensors[name]
    elif problem == "unexpected":
      tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((4,), np.float32)
    else:
      tensors[name] = np.zeros((32, 33), np.float32)

  rewrite_tensors(tmp_path, break_it)
  with pytest.raises(ValueError) as error:
    hf.load_encoder(tmp_path)
  message = str(error.value)
  assert str(tmp_path) in message
  expected = {"missing": f"missing (1): {name}",
              "unexpected": "unexpected (1): encoder.layer.0.attention.self.rotary.weight",
              "misshaped": f"mis-shaped (1): {name} (32, 33) (expected (32, 32))"}[problem]
  assert expected in message


def test_unsupported_model_types_name_themselves_and_the_supported_ones(tmp_path, llama_folder):
  gpt2 = tmp_path / "gpt2"
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
  with pytest.raises(ValueError) as error:
    hf.load_decoder(gpt2)
  message = str(error.value)
  assert "'gpt2'" in message and all(t in message for t in ("llama", "mistral", "qwen2"))
  assert str(gpt2) in message
  with pytest.raises(ValueError, match=r"encoder model_type 'llama' is not supported.*'bert'"):
    hf.load_encoder(llama_folder)
  with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
    hf.decoder_config_from_hf({**OLD_LINEAR, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_pickle_only_folder_says_how_to_convert(tmp_path):
  model = transformers.BertModel(transformers.BertConfig(**TINY_ENCODER))
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  for load in (hf.load_encoder, lambda folder: hf.load_decoder(_as_llama(folder))):
    with pytest.raises(ValueError) as error:
      load(tmp_path)
    message = str(error.value)
    assert "pytorch_model.bin" in message
    assert "only safetensors and GGUF" in message
    assert "safe_serialization=True" in message


def _as_llama(folder: pathlib.Path) -> pathlib.Path:
  """The same pickle-only folder with a Llama config.json."""
  config = transformers.AutoConfig.for_model(**TINY_DECODER).to_dict()
  (folder / "config.json").write_text(json.dumps(config))
  return folder


def test_missing_paths_and_files_are_named(tmp_path):
  absent = tmp_path / "no_such_model"
  for load in (hf.load_encoder, hf.load_decoder, hf.load_tokenizer):
    with pytest.raises(FileNotFoundError, match=str(absent)):
      load(absent)
  with pytest.raises(FileNotFoundError, match=str(absent) + ".gguf"):
    hf.load_decoder(str(absent) + ".gguf")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_decoder(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text(
      json.dumps(transformers.AutoConfig.for_model(**TINY_DECODER).to_dict()))
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    hf.load_decoder(tmp_path / "empty")
  with pytest.raises(ValueError, match="not a .gguf"):
    hf.load_decoder(tmp_path / "empty" / "config.json")


def test_sharded_index_naming_an_absent_shard_is_an_error(llama_folder, tmp_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    hf.load_decoder(tmp_path)


# ----------------------------------------------------------------------------------------------
# GGUF, written here with gguf.GGUFWriter the way llama.cpp's converter writes it.


def write_gguf(path: pathlib.Path, cfg, state: dict[str, np.ndarray], tokens=None, merges=None,
               token_types=None, chat_template=None) -> None:
  import gguf
  writer = gguf.GGUFWriter(str(path), cfg.model_type)
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_bos_token_id(cfg.bos_token_id)
  writer.add_eos_token_id(cfg.eos_token_id)
  if tokens is not None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(token_types)
    writer.add_pad_token_id(cfg.eos_token_id)
    writer.add_chat_template(chat_template)
  for name, tensor in state.items():
    if cfg.model_type == "llama" and ".q_proj." in name:
      tensor = weight_names.llama_cpp_rope_permute(tensor, cfg.num_heads)
    elif cfg.model_type == "llama" and ".k_proj." in name:
      tensor = weight_names.llama_cpp_rope_permute(tensor, cfg.num_kv_heads)
    writer.add_tensor(weight_names.gguf_name_from_hf(name), np.ascontiguousarray(tensor))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_rope_permutation_round_trips():
  weight = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
  permuted = weight_names.llama_cpp_rope_permute(weight, 6)
  assert not np.array_equal(permuted, weight)
  np.testing.assert_array_equal(weight_names.llama_cpp_rope_unpermute(permuted, 6), weight)
  # Row 1 of llama.cpp's layout is the partner of row 0, which HF keeps half a head further on.
  np.testing.assert_array_equal(permuted[1], weight[4])


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_gguf_decoder_matches_the_hf_folder(variant, tmp_path):
  save_causal_lm(tmp_path, **DECODER_VARIANTS[variant])
  cfg, params = hf.load_decoder(tmp_path)
  gguf_path = tmp_path / "model.gguf"
  write_gguf(gguf_path, cfg, saved_tensors(tmp_path))
  gguf_cfg, gguf_params = hf.load_decoder(gguf_path)
  assert gguf_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, gguf_params, params)


def test_gguf_with_an_unknown_tensor_lists_it(tmp_path, llama_folder):
  cfg, _ = hf.load_decoder(llama_folder)
  state = saved_tensors(llama_folder)
  del state["model.layers.1.mlp.down_proj.weight"]
  path = tmp_path / "broken.gguf"
  write_gguf(path, cfg, state)
  with pytest.raises(ValueError) as error:
    hf.load_decoder(path)
  assert str(path) in str(error.value)
  assert "missing (1): model.layers.1.mlp.down_proj.weight" in str(error.value)


def test_gguf_tokenizer_keeps_control_tokens_whole(tmp_path, llama_folder):
  cfg, _ = hf.load_decoder(llama_folder)
  spelling = hf_tokenizers.byte_spelling()
  alphabet = [spelling[b] for b in range(256)]
  control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  merged = ["he", "ll", "hell", "hello", "Ġw", "Ġwor"]
  merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw or", "o r"]
  tokens = control + alphabet + merged + ["or"]
  token_types = [3] * len(control) + [1] * (len(tokens) - len(control))
  template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
  cfg = dataclasses.replace(cfg, vocab_size=len(tokens), bos_token_id=1, eos_token_id=2)
  path = tmp_path / "tok.gguf"
  write_gguf(path, cfg, {}, tokens=tokens, merges=merges, token_types=token_types,
             chat_template=template)
  tokenizer = hf.load_tokenizer(path)
  ids = tokenizer("<|im_start|>hello world<|im_end|>")["input_ids"]
  vocab = {t: i for i, t in enumerate(tokens)}
  assert ids == [1, vocab["hello"], vocab["Ġwor"], vocab["l"], vocab["d"], 2]
  assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
          tokenizer.unk_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>", None)
  assert set(control) <= set(tokenizer.all_special_tokens)
  chat = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
  assert chat == "<|im_start|>hello<|im_end|>"
