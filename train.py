"""Training CLI: `python train.py --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Parses and checks the config, starts multi-process JAX if asked, and calls the library; re-running
resumes. Errors a user can fix end with one `error: ...` line (exit 2) and leave DIR as it was.
"""

from e2llm_jax import cli, host_memory, launch, preflight

_CONFIG, _WORKDIR = launch.define_cli_flags("Run folder: checkpoints, metrics, config.json.")


def main(argv):
  launch.check_no_extra_args(argv)
  config, workdir = _CONFIG.value, _WORKDIR.value
  preflight.check_train(config, workdir)
  host_memory.restart_with_huge_pages(config.model.compute_dtype)  # before anything is written
  launch.maybe_initialize_distributed(config)
  preflight.check_devices(config)
  # A run that saved a checkpoint can resume, so its files stay even if it fails later.
  cli.remove_on_failure(workdir, keep=lambda: bool(preflight.saved_steps(workdir)))
  from e2llm_jax.training import loop  # late: config errors above stay fast

  loop.train(config, workdir)


if __name__ == "__main__":
  cli.run(main, flags_parser=launch.parse_flags)  # the parser also validates the config
