"""Training CLI: `python train.py --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Parses and checks the config, starts multi-process JAX if asked, and calls the library; re-running
resumes. Errors a user can fix end with one `error: ...` line (exit 2) and leave DIR as it was.
"""

from e2llm_jax import cli, config_utils, host_memory, preflight

_CONFIG, _WORKDIR = config_utils.define_cli_flags("Run folder: checkpoints, metrics, config.json.")


def main(argv):
  config_utils.check_no_extra_args(argv)
  config, workdir = _CONFIG.value, _WORKDIR.value
  preflight.check_train(config, workdir)
  host_memory.restart_with_huge_pages(config.model.compute_dtype)  # before anything is written
  config_utils.maybe_initialize_distributed(config)
  preflight.check_devices(config)
  # A run that saved a checkpoint can resume, so its files stay even if it fails later.
  cli.remove_on_failure(workdir, keep=lambda: bool(preflight.saved_steps(workdir)))
  from e2llm_jax.training import loop  # late: config errors above stay fast

  loop.train(config, workdir)


if __name__ == "__main__":
  cli.run(main, flags_parser=config_utils.parse_flags)  # the parser also validates the config
