"""Chunker properties (hypothesis): size limit, sentence-end cuts, exact text recovery, overlap.

Also the padding to fixed shapes and the over-long policies. Encoder tokenizer: MiniLM (WordPiece).
"""

import functools

import hypothesis
import numpy as np
import pytest
import transformers
from hypothesis import strategies as st

from e2llm_jax import assets
from e2llm_jax.data import chunking

CLOSERS = chunking.CLOSING_CHARACTERS


@functools.lru_cache(maxsize=None)
def minilm():
  return transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())


def is_sentence_end(text, offsets, b):
  """Written apart from the chunker: a sentence ends between tokens b-1 and b (module doc's rule)."""
  previous_start, previous_end = offsets[b - 1]
  between = text[previous_end:offsets[b][0]]
  if "\n" in between or text[previous_end - 1:previous_end] == "\n":
    return True
  return between[:1].isspace() and text[:previous_end].rstrip(CLOSERS).endswith((".", "?", "!"))


words = st.one_of(st.text(alphabet="abcdefghijXYZ", min_size=1, max_size=9),
                  st.sampled_from(["Mr.", "3.14", "e.g.", "U.S.A.", "naïve", "déjà", "x" * 40,
                                   "supercalifragilisticexpialidocious", "(a)", "\"quoted\""]))
separators = st.sampled_from([" ", " ", " ", " ", ". ", "? ", "! ", ".\" ", "!) ", "\n", "\n\n",
                              ", ", "  ", "\t", ". \n", "...", "?!", "-"])


@st.composite
def prose(draw):
  pieces = [draw(st.sampled_from(["", " ", "\n", "  "]))]
  for _ in range(draw(st.integers(0, 60))):
    pieces += [draw(words), draw(separators)]
  return "".join(pieces)


def check_chunks(text, chunk_tokens, overlap, split_digits=False):
  tokenizer = minilm()
  chunker = chunking.Chunker(tokenizer, chunk_tokens, overlap, split_digits)
  chunks = chunker(text)
  # No chunk exceeds the limit, special tokens included.
  assert all(len(ids) <= chunk_tokens for ids in chunks.ids)
  assert all(ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
             for ids in chunks.ids)
  # Texts are the spans; the text comes back exactly.
  assert chunks.texts == [text[start:end] for start, end in chunks.spans]
  assert chunks.recover_text() == text
  assert chunks.spans[0][0] == 0 and chunks.spans[-1][1] == len(text)
  ids, offsets = chunking.tokenize_with_offsets(tokenizer, text, split_digits)
  if not ids:
    assert len(chunks) == 1
    return chunks
  ranges = chunker.token_ranges(text, offsets)
  assert [chunk[1:-1] for chunk in chunks.ids] == [ids[a:b] for a, b in ranges]
  budget = chunk_tokens - 2
  for index, (first, last) in enumerate(ranges):
    if index == len(ranges) - 1:
      assert last == len(ids) and last - first <= budget
      continue
    window = range(first + 1, first + budget + 1)
    ends = [b for b in window if is_sentence_end(text, offsets, b)]
    # The last sentence end in the window when there is one, else the token limit.
    assert last == (ends[-1] if ends else first + budget), (index, first, last, ends)
    next_first = ranges[index + 1][0]
    assert next_first == (last - overlap if last - overlap > first else last)
  return chunks


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(text=prose(), chunk_tokens=st.integers(3, 24))
def test_chunks_without_overlap(text, chunk_tokens):
  chunks = check_chunks(text, chunk_tokens, 0)
  # Without overlap the spans tile the text.
  for (_, end), (start, _) in zip(chunks.spans, chunks.spans[1:]):
    assert end == start


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(text=prose(), chunk_tokens=st.integers(4, 24), data=st.data())
def test_chunks_with_overlap(text, chunk_tokens, data):
  overlap = data.draw(st.integers(1, chunk_tokens - 3))
  chunks = check_chunks(text, chunk_tokens, overlap)
  assert all(start <= previous_end for (_, previous_end), (start, _) in
             zip(chunks.spans, chunks.spans[1:]))


awkward_text = st.one_of(
    st.text(max_size=300),
    # Punctuation, closers, newlines, control characters BERT drops, and Unicode spaces.
    st.text(alphabet=st.sampled_from(list("ab .!?\"')\n\t\x1f\x1b\u00a0\u2028é")), max_size=200))


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(text=awkward_text, chunk_tokens=st.integers(3, 12), data=st.data())
def test_any_unicode_text_keeps_every_property(text, chunk_tokens, data):
  check_chunks(text, chunk_tokens, data.draw(st.integers(0, chunk_tokens - 3)))


def test_cuts_at_sentence_ends_and_keeps_whitespace_with_the_earlier_chunk():
  text = "One two three. Four five six.\n\nSeven eight nine ten eleven twelve thirteen fourteen."
  chunks = chunking.chunk_text(text, minilm(), chunk_tokens=10)
  assert chunks.texts == ["One two three. Four five six.\n\n",
                          "Seven eight nine ten eleven twelve thirteen fourteen", "."]
  assert chunks.recover_text() == text


def test_split_digits_gives_one_encoder_token_per_digit_and_keeps_the_text():
  text = "Room 3041 opened in 1998. Call 555-0199!\nPi is 3.14159, not 22/7. Gate 12B at 07:45."
  ids, offsets = chunking.tokenize_with_offsets(minilm(), text, split_digits=True)
  pieces = minilm().convert_ids_to_tokens(ids)
  digit_pieces = [piece for piece in pieces if any(c.isdigit() for c in piece)]
  assert digit_pieces == [c for c in text if c.isdigit()]  # one token per digit, no "##" pieces
  # Offsets index the original text, not the spaced one.
  assert [text[a:b] for (a, b), piece in zip(offsets, pieces) if piece.isdigit()] == digit_pieces
  assert len(ids) > len(chunking.tokenize_with_offsets(minilm(), text)[0])
  for chunk_tokens, overlap in ((4, 0), (7, 2), (12, 5), (64, 0)):
    check_chunks(text, chunk_tokens, overlap, split_digits=True)  # recover_text() among them


def test_empty_and_whitespace_texts_give_one_chunk_of_special_tokens():
  for text in ("", "  \n "):
    chunks = chunking.chunk_text(text, minilm(), chunk_tokens=8)
    assert chunks.ids == [[minilm().cls_token_id, minilm().sep_token_id]]
    assert chunks.recover_text() == text


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match="chunk_tokens"):
    chunking.Chunker(minilm(), chunk_tokens=2)
  with pytest.raises(ValueError, match="chunk_overlap"):
    chunking.Chunker(minilm(), chunk_tokens=8, overlap=6)


def test_pad_chunks_shapes_and_masks():
  ids = [[101, 5, 6, 102], [101, 7, 102]]
  padded = chunking.pad_chunks(ids, max_chunks=3, chunk_tokens=5, pad_id=0)
  np.testing.assert_array_equal(padded.ids, [[101, 5, 6, 102, 0], [101, 7, 102, 0, 0], [0] * 5])
  np.testing.assert_array_equal(padded.token_mask, [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0] * 5])
  np.testing.assert_array_equal(padded.chunk_mask, [1, 1, 0])
  assert padded.ids.dtype == np.int32 and padded.num_dropped == 0
  with pytest.raises(ValueError, match="chunk_tokens"):
    chunking.pad_chunks([[1] * 6], max_chunks=1, chunk_tokens=5, pad_id=0)


def test_overlong_policies():
  ids = [[101, i, 102] for i in range(10)]
  padded = chunking.pad_chunks(ids, max_chunks=4, chunk_tokens=3, pad_id=0)
  assert padded.ids[:, 1].tolist() == [0, 1, 8, 9] and padded.num_dropped == 6
  assert chunking.kept_chunk_indices(10, 5, "head_tail") == [0, 1, 2, 8, 9]
  assert chunking.kept_chunk_indices(10, 3, "head") == [0, 1, 2]
  assert chunking.kept_chunk_indices(10, 3, "tail") == [7, 8, 9]
  assert chunking.kept_chunk_indices(3, 5, "error") == [0, 1, 2]
  with pytest.raises(ValueError, match="max_chunks"):
    chunking.kept_chunk_indices(10, 3, "error")
  with pytest.raises(ValueError, match="overlong_policy"):
    chunking.kept_chunk_indices(1, 3, "middle")
  chunks = chunking.chunk_text("A. B. C. D. E.", minilm(), chunk_tokens=4)
  kept, dropped = chunking.drop_overflow(chunks, 2)
  assert kept.texts == ["A. ", "E."] and dropped == 3
