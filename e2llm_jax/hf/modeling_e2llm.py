"""E2LLM in PyTorch for `AutoModel.from_pretrained(export, trust_remote_code=True)`: text → soft tokens → answer.

Copied by e2llm_jax's export beside encoder/, decoder/, adapter.safetensors and e2llm_config.json; it
imports only torch, transformers, safetensors and numpy, and repeats e2llm_jax's chunking and prompt rules.
"""

import json
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (AutoModelForCausalLM, AutoTokenizer, BertModel, PretrainedConfig,
                          PreTrainedModel)

E2LLM_CONFIG_FILE = "e2llm_config.json"
ADAPTER_FILE = "adapter.safetensors"
# The same rules as e2llm_jax.data.chunking and e2llm_jax.data.tasks (a test checks they agree).
SENTENCE_END_CHARACTERS = ".?!"
CLOSING_CHARACTERS = "\"')]}»”’"
CHAT_SENTINEL = "\u2063E2LLM_USER_MESSAGE\u2063"
TEMPLATE_MARKER = "\x00"


# ----------------------------------------------------------------------------------------------
# Chunking: the encoder tokenizer's offsets, cut at the last sentence end that fits a chunk.


def special_token_wrappers(tokenizer):
  """The ids a tokenizer puts before and after a single sequence ([CLS] and [SEP] for BERT)."""
  plain = tokenizer("a", add_special_tokens=False)["input_ids"]
  wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
  for start in range(len(wrapped) - len(plain) + 1):
    if wrapped[start:start + len(plain)] == plain:
      return list(wrapped[:start]), list(wrapped[start + len(plain):])
  raise ValueError(f"cannot locate the text inside the special tokens: {wrapped} lacks {plain}")


def spaced_digits(text):
  """`text` with a space between neighbouring digits, and for each of its characters (plus the end)
  the index of the character of `text` it comes from."""
  out, source = [], []
  for index, char in enumerate(text):
    if char.isdigit() and index > 0 and text[index - 1].isdigit():
      out.append(" ")
      source.append(index)
    out.append(char)
    source.append(index)
  source.append(len(text))
  return "".join(out), np.asarray(source, np.int64)


def tokenize_with_offsets(tokenizer, text, split_digits=False):
  """`split_digits`: one WordPiece token per digit, offsets still index `text`."""
  if split_digits:
    spaced, source = spaced_digits(text)
    ids, offsets = tokenize_with_offsets(tokenizer, spaced)
    return ids, source[offsets] if len(offsets) else offsets
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None and backend.truncation is None:
    encoding = backend.encode(text, add_special_tokens=False)
    ids, offsets = encoding.ids, encoding.offsets
  else:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
  return list(ids), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def sentence_cut_positions(text, offsets):
  """Token indices b such that a sentence ends between tokens b-1 and b."""
  num_tokens = len(offsets)
  if num_tokens < 2:
    return np.zeros((0,), np.int64)
  codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
  starts, ends = offsets[:, 0], offsets[:, 1]
  newline_counts = np.concatenate([[0], np.cumsum(codes == ord("\n"))])
  previous_last = np.maximum(ends[:-1] - 1, starts[:-1])
  next_start = starts[1:]
  has_newline = newline_counts[np.maximum(next_start, previous_last)] > newline_counts[previous_last]
  is_closing = np.isin(codes, [ord(c) for c in CLOSING_CHARACTERS])
  positions = np.arange(len(codes))
  last_open = np.maximum.accumulate(np.where(is_closing, -1, positions))
  punctuation_index = last_open[previous_last]
  ends_sentence = np.isin(codes[np.maximum(punctuation_index, 0)],
                          [ord(c) for c in SENTENCE_END_CHARACTERS]) & (punctuation_index >= 0)
  candidates = ends_sentence & (next_start > ends[:-1])
  followed_by_space = np.zeros_like(candidates)
  for index in np.flatnonzero(candidates):
    followed_by_space[index] = text[ends[index]].isspace()
  return np.flatnonzero(has_newline | followed_by_space) + 1


def chunk_ids(tokenizer, text, chunk_tokens, overlap, split_digits=False):
  """Encoder ids of every chunk of `text`, special tokens included."""
  head, tail = special_token_wrappers(tokenizer)
  budget = chunk_tokens - len(head) - len(tail)
  ids, offsets = tokenize_with_offsets(tokenizer, text, split_digits)
  if not ids:
    return [head + tail]
  cuts = sentence_cut_positions(text, offsets)
  chunks, first = [], 0
  while True:
    if len(ids) - first <= budget:
      chunks.append(head + ids[first:] + tail)
      return chunks
    limit = first + budget
    index = np.searchsorted(cuts, limit, side="right") - 1
    cut = int(cuts[index]) if index >= 0 and cuts[index] > first else limit
    chunks.append(head + ids[first:cut] + tail)
    first = cut - overlap if cut - overlap > first else cut


# ----------------------------------------------------------------------------------------------
# Prompt: chat template split around the soft tokens, the prompt template's text inside it.


def split_template(template_text, question):
  rendered = template_text.format(context=TEMPLATE_MARKER,
                                  question=question.replace(TEMPLATE_MARKER, ""))
  prefix, query = rendered.split(TEMPLATE_MARKER)
  return prefix, query


def chat_wrappers(tokenizer, system_prompt):
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  messages.append({"role": "user", "content": CHAT_SENTINEL})
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  opening, closing = rendered.split(CHAT_SENTINEL)
  return opening, closing


def fit(head, body, tail, limit, what):
  """head + body + tail within `limit` ids; the body loses its middle when it must."""
  room = limit - len(head) - len(tail)
  if room < 0:
    raise ValueError(f"the fixed {what} text takes {len(head) + len(tail)} tokens > {limit}.")
  if len(body) <= room:
    return head + body + tail
  keep_front = room - room // 2
  return head + body[:keep_front] + (body[len(body) - room // 2:] if room // 2 else []) + tail


def text_ids(tokenizer, text):
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None and backend.truncation is None:
    return list(backend.encode(text, add_special_tokens=False).ids)
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------
# The modules: pooling (cls / mean / pma / tokens), adapter, and the two towers.


class Pooling(nn.Module):
  """Chunk outputs [B,T,D] → [B,k,D]: `cls`, masked `mean`, `pma` (k learned seeds attend), or
  `tokens` (k = T: every position; `compress` keeps the text tokens' ones)."""

  def __init__(self, kind, width, num_tokens, num_heads, ffn_size, eps):
    super().__init__()
    self.kind, self.num_heads = kind, num_heads
    if kind == "pma":
      self.seeds = nn.Parameter(torch.zeros(num_tokens, width))
      for name in ("query", "key", "value", "attention_output"):
        setattr(self, name, nn.Linear(width, width))
      self.attention_norm = nn.LayerNorm(width, eps=eps)
      self.ffn_in, self.ffn_out = nn.Linear(width, ffn_size), nn.Linear(ffn_size, width)
      self.output_norm = nn.LayerNorm(width, eps=eps)

  def forward(self, hidden, mask):
    if self.kind == "cls":
      return hidden[:, :1]
    if self.kind == "tokens":
      return hidden
    mask_f = mask.to(hidden.dtype)[..., None]
    if self.kind == "mean":
      return (hidden * mask_f).sum(1, keepdim=True) / mask_f.sum(1, keepdim=True).clamp(min=1.0)
    batch, length, width = hidden.shape
    heads, head_dim = self.num_heads, width // self.num_heads
    seeds = self.seeds[None].expand(batch, -1, -1)
    q = self.query(seeds).view(batch, -1, heads, head_dim).transpose(1, 2)
    k = self.key(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
    v = self.value(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, width)
    h = self.attention_norm(seeds + self.attention_output(attn))
    return self.output_norm(h + self.ffn_out(nn.functional.gelu(self.ffn_in(h))))


class Adapter(nn.Module):
  """2-layer MLP with exact GELU: pooled chunk vectors → decoder embeddings (the soft tokens)."""

  def __init__(self, width, hidden, output):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, output)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))


class E2LLMConfig(PretrainedConfig):
  model_type = "e2llm"


class E2LLMModel(PreTrainedModel):
  """Both towers, the pooling head and the adapter; `compress(text)` and greedy `generate(...)`."""
  config_class = E2LLMConfig
  base_model_prefix = "e2llm"

  def __init__(self, config, encoder=None, decoder=None, settings=None):
    super().__init__(config)
    model = settings["model"]
    width = encoder.config.hidden_size
    self.settings = settings
    self.encoder, self.decoder = encoder, decoder
    self.pooling = Pooling(model["pooling"], width, model["tokens_per_chunk"], model["pma_heads"],
                           model["pma_ffn_size"], model["pma_layer_norm_eps"])
    self.adapter = Adapter(width, model["adapter_hidden"], decoder.config.hidden_size)

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
    root = os.fspath(pretrained_model_name_or_path)
    with open(os.path.join(root, E2LLM_CONFIG_FILE)) as f:
      settings = json.load(f)
    if settings.get("kind") != "full":
      raise ValueError(f"{root} is an adapters-only export: it has no merged towers to run here; "
                       "load it with e2llm_jax (E2LLM.from_export) or export without --adapters-only.")
    config = config or E2LLMConfig.from_pretrained(root)
    towers = settings["towers"]
    encoder = BertModel.from_pretrained(os.path.join(root, towers["encoder"]),
                                        add_pooling_layer=False, local_files_only=True)
    decoder = AutoModelForCausalLM.from_pretrained(os.path.join(root, towers["decoder"]),
                                                   local_files_only=True)
    model = cls(config, encoder, decoder, settings)
    head = load_file(os.path.join(root, ADAPTER_FILE))
    for name in ("pooling", "adapter"):
      part = {k[len(name) + 1:]: v for k, v in head.items() if k.startswith(name + ".")}
      getattr(model, name).load_state_dict(part, strict=True)
    model.encoder_tokenizer = AutoTokenizer.from_pretrained(
        os.path.join(root, towers["encoder"]), local_files_only=True)
    model.decoder_tokenizer = AutoTokenizer.from_pretrained(
        os.path.join(root, towers["decoder"]), local_files_only=True)
    return model.eval()

  def _init_weights(self, module):
    pass  # every weight comes from the export's files

  @torch.no_grad()
  def compress(self, text):
    """Soft tokens [num_chunks·k, decoder width] of `text`, every chunk kept (pooling `tokens`:
    one per text token of each chunk, in order)."""
    data = self.settings["data"]
    # Exports written before encoder_split_digits existed tokenized digits as they come.
    chunks = chunk_ids(self.encoder_tokenizer, text, data["chunk_tokens"], data["chunk_overlap"],
                       data.get("encoder_split_digits", False))
    length = max(len(c) for c in chunks)
    pad = self.encoder_tokenizer.pad_token_id or 0
    ids = torch.tensor([c + [pad] * (length - len(c)) for c in chunks])
    mask = torch.tensor([[1] * len(c) + [0] * (length - len(c)) for c in chunks])
    hidden = self.encoder(input_ids=ids, attention_mask=mask,
                          token_type_ids=torch.zeros_like(ids)).last_hidden_state
    soft = self.adapter(self.pooling(hidden.float(), mask))
    if self.pooling.kind == "tokens":
      # The decoder reads no [CLS] (position 0), [SEP] (the last real one) or padding slot.
      keep = mask.bool() & torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1).bool()
      keep[:, 0] = False
      return soft[keep]
    return soft.reshape(-1, soft.shape[-1])

  def prompt_ids(self, question, template="qa"):
    """(prefix ids, query ids): the decoder text before and after the soft tokens."""
    data, tokenizer = self.settings["data"], self.decoder_tokenizer
    found = data["templates"].get(template, {"text": template})
    prefix_text, query_text = split_template(found["text"], question)
    use_chat = data["chat_template"]
    if use_chat is None:
      use_chat = bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
      opening, closing = chat_wrappers(tokenizer, data["system_prompt"])
      leading = []
    else:
      opening, closing = "", ""
      leading = special_token_wrappers(tokenizer)[0]
    prefix = text_ids(tokenizer, opening + prefix_text)
    if len(leading) + len(prefix) > data["prefix_tokens"]:
      prefix = fit(leading + text_ids(tokenizer, opening), text_ids(tokenizer, prefix_text), [],
                   data["prefix_tokens"], "prefix")
    else:
      prefix = leading + prefix
    query = text_ids(tokenizer, query_text + closing)
    if len(query) > data["query_tokens"]:
      query = fit([], text_ids(tokenizer, query_text), text_ids(tokenizer, closing),
                  data["query_tokens"], "query")
    return prefix, query

  @torch.no_grad()
  def generate(self, question, context, max_new_tokens=None, template="qa", return_ids=False):
    """Greedy answer to `question` about `context` (text, or soft tokens from `compress`)."""
    max_new_tokens = max_new_tokens or self.settings["data"]["target_tokens"]
    soft = self.compress(context) if isinstance(context, str) else context
    prefix, query = self.prompt_ids(question, template)
    embed = self.decoder.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor([prefix])), soft[None].to(embed.weight.dtype),
                        embed(torch.tensor([query]))], dim=1)
    eos = self.decoder_tokenizer.eos_token_id
    out = self.decoder(inputs_embeds=embeds, use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
      token = int(out.logits[0, -1].argmax())
      if token == eos:
        break
      tokens.append(token)
      # transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`.
      cache = {"cache": out.cache} if "cache" in out else {"past_key_values": out.past_key_values}
      out = self.decoder(input_ids=torch.tensor([[token]]), use_cache=True, **cache)
    if return_ids:
      return tokens
    return self.decoder_tokenizer.decode(tokens, skip_special_tokens=True)
