"""How train.py and eval.py start: the shared absl flags, overrides checked and validated before
anything heavy loads, and `jax.distributed` when the config or a launcher asks for several processes.
"""

import os
import re
import sys
from typing import Mapping, Sequence

import ml_collections

from e2llm_jax import config_utils, errors


def distributed_launch_reason(environ: Mapping[str, str] = os.environ) -> str | None:
  """Which launcher environment asks for a multi-process run, or None for a single process.

  Recognised: `JAX_COORDINATOR_ADDRESS` (any launcher; with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`, see scripts/k8s_jobset.yaml), SLURM steps with more than one task (srun),
  and Open MPI with more than one rank. TPU pods have no such variable: pass
  `--config.distributed=True` (scripts/tpu_pod.sh) and JAX asks the TPU metadata server.
  """
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  if "SLURM_STEP_NODELIST" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return f"SLURM step with {environ['SLURM_NTASKS']} tasks"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return f"Open MPI with {environ['OMPI_COMM_WORLD_SIZE']} ranks"
  return None


def maybe_initialize_distributed(config: ml_collections.ConfigDict,
                                 environ: Mapping[str, str] = os.environ) -> bool:
  """`jax.distributed.initialize()` if the config or the launcher asks; True if multi-process.

  Must run before anything touches a JAX device. JAX itself fills in the coordinator, process
  count and id from SLURM / Open MPI / TPU metadata; `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
  cover launchers it does not know.
  """
  import jax  # late: keeps `train.py --help` and config errors fast

  if jax.distributed.is_initialized():
    return True
  reason = "config.distributed=True" if config.distributed else distributed_launch_reason(environ)
  if reason is None:
    return False
  kwargs = {}
  if "JAX_NUM_PROCESSES" in environ:
    kwargs["num_processes"] = int(environ["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in environ:
    kwargs["process_id"] = int(environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  print(f"jax.distributed initialised ({reason}): process {jax.process_index()} of "
        f"{jax.process_count()}, {jax.local_device_count()} local devices", file=sys.stderr)
  return True


def _overrides(argv: Sequence[str], flag: str) -> list[tuple[str, str]]:
  """(dotted key, raw argument) of every `--flag.a.b=v` on the command line, in order."""
  found = []
  for arg in argv:
    match = re.match(rf"^--?{flag}\.([^=]+)(=.*)?$", arg)
    if match:
      found.append((match.group(1), arg))
  return found


def define_cli_flags(workdir_help: str):
  """The `--config` (locked ConfigDict file) and `--workdir` flags that train.py and eval.py share."""
  from absl import flags  # late: only the CLIs define flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/*.py), optionally `file.py:arg`.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir


def check_no_extra_args(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {list(argv[1:])}; flags are written "
                             "--name=value (config values as --config.a.b=value)")


def parse_flags(argv: Sequence[str], flag: str = "config") -> list[str]:
  """absl `flags_parser` for the CLIs: parse, then `validate`; every config error is a ConfigError.

  config_flags already reports a bad value in one line ("flag --config.train.steps=abc: invalid
  literal for int()"), but a misspelled key surfaces as an AttributeError traceback: we name the
  override and the nearest key instead. Runs before anything heavy is imported; `cli.run` prints
  the error as one line with exit status 2.
  """
  from absl import flags

  for arg in argv[1:]:
    match = re.match(rf"^--?{flag}=([^:]*)", arg)
    if match and not os.path.isfile(match.group(1)):
      raise errors.ConfigError(f"{arg}: no such config file; pass one of configs/*.py or your own "
                               "file with a get_config() function")
  try:
    remaining = flags.FLAGS(list(argv))
  except flags.Error as error:  # a bad value, or a config file that raised (its traceback as text)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = f" {lines[-1]}" if any(line.startswith("Traceback") for line in lines) else ""
    raise errors.ConfigError(f"{lines[0]}{cause}; see --helpshort") from None
  except (AttributeError, KeyError) as error:
    text = str(error)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    culprit = _failing_override(_overrides(argv, flag), text)
    message = f"{culprit or '--' + flag + ' override'}: no such config key"
    if hint:
      message += f" (did you mean {hint.group(1)!r}?)"
    message += ("; config files define every key (e2llm_jax/config_utils.py: base_config) and "
                "overrides can only change existing ones")
    raise errors.ConfigError(message) from None
  # app.run raises an unset verbosity to INFO, which floods the console with Orbax's per-file
  # save logs; setting it here keeps warnings only (`--verbosity=0` brings INFO back).
  if flags.FLAGS["verbosity"].using_default_value:
    flags.FLAGS.verbosity = -1
  config_utils.validate(flags.FLAGS[flag].value)
  return remaining


def _failing_override(overrides: list[tuple[str, str]], error_text: str) -> str | None:
  """The override a config_flags error is about: its full key, else a quoted component, is named."""
  for key, arg in sorted(overrides, key=lambda pair: -len(pair[0])):
    if "." in key and key in error_text:
      return arg
  for key, arg in overrides:
    if any(re.search(rf"'{re.escape(part)}\\*'", error_text) for part in key.split(".")):
      return arg
  return None
