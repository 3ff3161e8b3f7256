"""What eval.py runs: a trained workdir's E2LLM and baselines over `eval.tasks` × `eval.lengths`, reported.

Outputs go to WORKDIR/eval/ (results.json, predictions.jsonl, report.md, PNGs); passkey runs get exact match.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax

from e2llm_jax import errors
from e2llm_jax.data import passkey
from e2llm_jax.evaluation import held_out, predictors, report, runner

EVAL_DIR = "eval"


def _names(spec: str) -> list[str]:
  return [part.strip() for part in str(spec or "").split(",") if part.strip()]


def evaluate_engine(config, engine: Any, seed: int, tokens_per_chunk: int, progress: bool = False
                    ) -> dict[str, Any]:
  """Runner results of E2LLM and `eval.baselines` over `eval.tasks` × `eval.lengths`.

  Samples come from the held-out evaluation stream of the run's `seed`; `tokens_per_chunk` (the run's
  soft tokens per chunk) sizes the rag baseline's budget.
  """
  spec = config.eval
  lengths = [int(n) for n in spec.lengths]
  if not lengths or any(n <= 0 for n in lengths):
    raise errors.ConfigError(f"eval.lengths={tuple(spec.lengths)} must be positive decoder-token counts.")
  if int(spec.num_samples) < 0 or int(spec.batch_size) < 1:
    raise errors.ConfigError(f"eval.num_samples={spec.num_samples} must be >= 0 and eval.batch_size="
                     f"{spec.batch_size} >= 1.")
  tasks = runner.parse_tasks(spec.tasks, engine.decoder_tokenizer, seed, int(spec.max_new_tokens))
  methods = predictors.make_predictors(engine, _names(spec.baselines), tokens_per_chunk,
                                       int(spec.rag_budget_tokens))
  return runner.evaluate(tasks, lengths, methods, num_samples=int(spec.num_samples),
                         batch_size=int(spec.batch_size), progress=progress)


def evaluate_workdir(config, workdir: str | pathlib.Path, progress: bool = True) -> dict[str, Any]:
  """Evaluate the newest (or `eval.step`) checkpoint of `workdir`; returns a summary to print."""
  from e2llm_jax.inference import E2LLM  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  engine = E2LLM.from_workdir(str(workdir), step=config.eval.step)
  run_config = engine.config  # the config the run was trained with
  step = int(engine.step)
  if passkey.is_passkey_run(run_config):
    model = engine.model
    task = passkey.task_from_config(run_config, min(model.encoder.vocab_size,
                                                    model.decoder.vocab_size))
    result = held_out.evaluate_passkey(
        model, engine.frozen, engine.trainable, task, int(run_config.seed),
        int(config.eval.num_samples), int(config.eval.batch_size), engine.mesh, run_config.mesh.rules)
    summary = {"step": step, **result}
    if jax.process_index() == 0:
      out = workdir / EVAL_DIR
      out.mkdir(parents=True, exist_ok=True)
      (out / report.RESULTS_FILE).write_text(json.dumps(summary, indent=2))
    return summary
  results = evaluate_engine(config, engine, int(run_config.seed), int(run_config.model.tokens_per_chunk),
                            progress=progress and jax.process_index() == 0)
  summary = {"step": step, "rows": results["rows"], "table": report.markdown_table(results["rows"])}
  if jax.process_index() == 0:
    written = report.write(results, workdir / EVAL_DIR, extra={"step": step, "workdir": str(workdir)})
    summary["files"] = {name: str(path) for name, path in written.items()}
  return summary
