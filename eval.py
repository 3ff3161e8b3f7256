"""Evaluation CLI: `python eval.py --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Same flags as train.py; evaluates the newest checkpoint in DIR and prints the metrics as JSON.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from e2llm_jax import config_utils

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), optionally `file.py:arg`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder holding the checkpoints to evaluate.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_utils.maybe_initialize_distributed(config)
  from e2llm_jax.training import loop  # late: config errors above stay fast

  result = loop.evaluate(config, _WORKDIR.value)
  print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags)  # also validates the config
