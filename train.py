"""Training CLI: `python train.py --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Parses the config, starts multi-process JAX if asked, and calls the library; re-running resumes.
"""

from absl import app

from e2llm_jax import config_utils

_CONFIG, _WORKDIR = config_utils.define_cli_flags("Run folder: checkpoints, metrics, config.json.")


def main(argv):
  config_utils.check_no_extra_args(argv)
  config = _CONFIG.value
  config_utils.maybe_initialize_distributed(config)
  from e2llm_jax.training import loop  # late: config errors above stay fast

  loop.train(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags)  # also validates the config
