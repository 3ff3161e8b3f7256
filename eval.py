"""Evaluation CLI: `python eval.py --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Same flags as train.py; evaluates the newest checkpoint (or `eval.step`) in DIR over `eval.*`, writes DIR/eval/.
"""

import json

from e2llm_jax import cli, launch, preflight

_CONFIG, _WORKDIR = launch.define_cli_flags("Run folder holding the checkpoints to evaluate.")


def main(argv):
  launch.check_no_extra_args(argv)
  config, workdir = _CONFIG.value, _WORKDIR.value
  preflight.check_eval(config, workdir)
  launch.maybe_initialize_distributed(config)
  preflight.check_devices(config)
  cli.remove_on_failure(workdir)  # only what this evaluation adds; the run's files stay
  from e2llm_jax.evaluation import suite  # late: config errors above stay fast

  result = suite.evaluate_workdir(config, workdir)
  if "table" in result:
    print(f"step {result['step']}\n\n{result['table']}")
    print("\n".join(f"{name}: {path}" for name, path in result.get("files", {}).items()))
  else:
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
  cli.run(main, flags_parser=launch.parse_flags)  # the parser also validates the config
