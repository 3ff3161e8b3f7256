"""Example layout: the soft-token slot inside the chat template's user turn, masks, EOS, templates.

A tiny byte-level ChatML tokenizer is built here; MiniLM stands in as the encoder (and plain decoder).
"""

import functools

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers

from e2llm_jax import assets
from e2llm_jax.data import chunking, tasks

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONTEXT = ("The cat sat on the mat. It was warm. The dog barked at the mailman, who ran away! "
           "Then it rained.\nThe end of the story came soon after that.")


@functools.lru_cache(maxsize=None)
def minilm(eos=False):
  # BERT has no EOS; as a stand-in decoder its [SEP] plays that part.
  kwargs = {"eos_token": "[SEP]"} if eos else {}
  return transformers.AutoTokenizer.from_pretrained(assets.minilm_dir(), **kwargs)


@functools.lru_cache(maxsize=None)
def chatml_tokenizer():
  """Byte-level BPE without merges (one token per byte) plus ChatML's special tokens."""
  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
      chat_template=CHATML)


def sizes(**overrides):
  values = dict(chunk_tokens=12, max_chunks=4, prefix_tokens=160, query_tokens=96, target_tokens=24,
                recon_window=2)
  values.update(overrides)
  return tasks.ExampleSizes(**values)


def real(ids, mask):
  return ids[mask == 1].tolist()


def test_soft_tokens_sit_inside_the_chat_templates_user_turn():
  tokenizer = chatml_tokenizer()
  encoder = tasks.ExampleEncoder(minilm(), tokenizer, sizes(), system_prompt="Be brief.")
  assert encoder.uses_chat_template
  example = encoder.instruction(CONTEXT, "Where did the cat sit?", "on the mat")
  prefix = tokenizer.decode(real(example["prefix_ids"], example["prefix_mask"]))
  query = tokenizer.decode(real(example["query_ids"], example["query_mask"]))
  target = real(example["target_ids"], example["target_mask"])
  # The whole prompt with the context's text where the soft tokens go is the chat template's rendering.
  template_prefix, template_query = tasks.split_template(tasks.PROMPT_TEMPLATES["qa"],
                                                         "Where did the cat sit?")
  rendered = tokenizer.apply_chat_template(
      [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": template_prefix + "<SOFT>" + template_query}],
      tokenize=False, add_generation_prompt=True)
  assert prefix + "<SOFT>" + query == rendered
  assert prefix.endswith("Text:\n") and "<|im_start|>user\n" in prefix
  assert query.endswith("<|im_end|>\n<|im_start|>assistant\n")
  # The target is the answer and EOS (the end of the assistant turn).
  assert target[-1] == tokenizer.eos_token_id
  assert tokenizer.decode(target) == "on the mat<|im_end|>"


def test_masks_padding_sides_and_shapes():
  tokenizer = minilm(eos=True)
  encoder = tasks.ExampleEncoder(minilm(), tokenizer, sizes(prefix_tokens=40, query_tokens=20))
  assert not encoder.uses_chat_template
  example = encoder.instruction(CONTEXT, "Where did the cat sit?", "on the mat")
  assert {k: v.shape for k, v in example.items()} == dict(tasks.example_shapes(encoder.sizes))
  assert all(v.dtype == np.int32 for v in example.values())
  pad = tokenizer.pad_token_id
  for name, left in (("prefix", True), ("query", True), ("target", False)):
    ids, mask = example[f"{name}_ids"], example[f"{name}_mask"]
    count = int(mask.sum())
    expected = np.r_[np.zeros(len(mask) - count), np.ones(count)] if left else np.r_[
        np.ones(count), np.zeros(len(mask) - count)]
    np.testing.assert_array_equal(mask, expected)
    assert (ids[mask == 0] == pad).all()
  # Without a chat template the prefix starts with the tokenizer's own leading special token.
  assert real(example["prefix_ids"], example["prefix_mask"])[0] == tokenizer.cls_token_id
  assert real(example["target_ids"], example["target_mask"])[-1] == tokenizer.eos_token_id
  assert example["task"] == tasks.TASK_INSTRUCTION
  # The chunks are the chunker's, padded.
  chunks = chunking.chunk_text(CONTEXT, minilm(), 12)
  assert int(example["chunk_mask"].sum()) == min(len(chunks), 4)
  assert example["chunks_dropped"] == max(len(chunks) - 4, 0)
  first = chunks.ids[0]
  assert example["chunk_ids"][0, :len(first)].tolist() == first
  assert example["chunk_token_mask"][0].sum() == len(first)


def test_long_target_is_cut_without_eos_and_long_question_loses_its_middle():
  tokenizer = chatml_tokenizer()
  encoder = tasks.ExampleEncoder(minilm(), tokenizer, sizes(target_tokens=5, query_tokens=60))
  question = "Q" * 10 + "m" * 100 + "Z" * 10
  example = encoder.instruction(CONTEXT, question, "a long answer")
  target = real(example["target_ids"], example["target_mask"])
  assert len(target) == 5 and tokenizer.eos_token_id not in target
  assert example["target_tokens_dropped"] == len("a long answer") + 1 - 5
  query = tokenizer.decode(real(example["query_ids"], example["query_mask"]))
  assert example["prompt_tokens_dropped"] > 0 and len(real(example["query_ids"],
                                                          example["query_mask"])) == 60
  assert query.endswith("\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
  assert query.startswith("\n\nQuestion: QQQ")
  with pytest.raises(ValueError, match="query_tokens"):
    tasks.ExampleEncoder(minilm(), tokenizer, sizes(query_tokens=10)).instruction(CONTEXT, "q", "a")


def test_reconstruction_targets_the_window_text():
  tokenizer = minilm(eos=True)
  encoder = tasks.ExampleEncoder(minilm(), tokenizer, sizes(target_tokens=64))
  chunks = chunking.chunk_text(CONTEXT, minilm(), 12)
  assert len(chunks) > 3
  example = encoder.reconstruction(CONTEXT, window_start=1)
  assert example["task"] == tasks.TASK_RECONSTRUCTION
  np.testing.assert_array_equal(example["chunk_mask"], [1, 1, 0, 0])
  assert example["chunk_ids"][0, :len(chunks.ids[1])].tolist() == chunks.ids[1]
  window_text = (chunks.texts[1] + chunks.texts[2]).strip()
  expected = tokenizer(window_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  assert real(example["target_ids"], example["target_mask"]) == expected
  query = tokenizer.decode(real(example["query_ids"], example["query_mask"]))
  assert query == "restate the text above word for word."
  # A random window is one of the valid ones, and the same rng gives the same window.
  first = encoder.reconstruction(CONTEXT, np.random.default_rng(3))
  second = encoder.reconstruction(CONTEXT, np.random.default_rng(3))
  np.testing.assert_array_equal(first["chunk_ids"], second["chunk_ids"])
  with pytest.raises(ValueError, match="window_start"):
    encoder.reconstruction(CONTEXT, window_start=len(chunks))


def test_overlong_context_follows_the_policy():
  long_context = " ".join(f"Sentence number {i} is here." for i in range(40))
  encoder = tasks.ExampleEncoder(minilm(), minilm(eos=True), sizes())
  example = encoder.instruction(long_context, "q", "a")
  assert example["chunk_mask"].sum() == 4 and example["chunks_dropped"] > 0
  strict = tasks.ExampleEncoder(minilm(), minilm(eos=True), sizes(), overlong_policy="error")
  with pytest.raises(ValueError, match="max_chunks"):
    strict.instruction(long_context, "q", "a")


def test_templates_by_name_or_literal():
  literal = tasks.resolve_template("Doc: {context}\nQ: {question}\nA:")
  assert tasks.split_template(literal, "why?") == ("Doc: ", "\nQ: why?\nA:")
  assert tasks.split_template(tasks.resolve_template("plain"), "x {y}") == ("", "\n\nx {y}")
  assert tasks.resolve_template("multiple_choice").answer.format(answer="B") == (
      "The correct answer is (B).")
  for bad in ("no context here", "{context} {context}", "{context} {other}"):
    with pytest.raises(ValueError, match="template"):
      tasks.resolve_template(bad)
  encoder = tasks.ExampleEncoder(minilm(), minilm(eos=True), sizes(target_tokens=16))
  example = encoder.instruction(CONTEXT, "Pick one", "C", template="multiple_choice")
  target = minilm().decode(real(example["target_ids"], example["target_mask"]))
  assert target == "the correct answer is ( c ). [SEP]"


def test_decoder_without_eos_or_template_is_refused():
  with pytest.raises(ValueError, match="EOS"):
    tasks.ExampleEncoder(minilm(), minilm(), sizes())
  with pytest.raises(ValueError, match="chat template"):
    tasks.ExampleEncoder(minilm(), minilm(eos=True), sizes(), chat_template=True)
  with pytest.raises(ValueError, match="recon_window"):
    sizes(recon_window=5)
