"""Evaluation CLI: `python eval.py --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Same flags as train.py; evaluates the newest checkpoint in DIR and prints the metrics as JSON.
"""

import json

from absl import app

from e2llm_jax import config_utils

_CONFIG, _WORKDIR = config_utils.define_cli_flags("Run folder holding the checkpoints to evaluate.")


def main(argv):
  config_utils.check_no_extra_args(argv)
  config = _CONFIG.value
  config_utils.maybe_initialize_distributed(config)
  from e2llm_jax.training import loop  # late: config errors above stay fast

  result = loop.evaluate(config, _WORKDIR.value)
  print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags)  # also validates the config
