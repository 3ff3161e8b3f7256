"""Entry point of `python -m e2llm_jax.data.ruler`: runs `jsonl_cli.main` under the project's CLI error path.

Only `-m` runs this file; the CLI itself lives in `jsonl_cli`, which the package re-exports as `main`.
"""

from e2llm_jax import cli
from e2llm_jax.data.ruler.jsonl_cli import main

if __name__ == "__main__":
  cli.run(main)
