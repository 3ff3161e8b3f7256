"""Config files and the CLI: required keys and types, overrides, clean errors, distributed start-up.

CLI failures run train.py in a subprocess; they must stop before JAX or training code is imported.
"""

import importlib.util
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from e2llm_jax import config_utils, launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = sorted(path.name for path in (ROOT / "configs").glob("*.py")
                      if path.name != "__init__.py")
PAPER_CONFIGS = ("paper_gte_llama2_7b.py", "paper_gte_qwen25_7b.py")
HEAVY_MODULES = ("jax", "flax", "orbax", "optax", "e2llm_jax.training", "e2llm_jax.models")


def config_arg(name: str, tmp_path: pathlib.Path) -> str | None:
  # Paper configs need local model folders; any existing folder passes the path check.
  return f"encoder={tmp_path},decoder={tmp_path}" if name in PAPER_CONFIGS else None


def get_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse(argv: list[str]) -> ml_collections.ConfigDict:
  """The config train.py would see for `argv`, through the same config_flags machinery."""
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  flag_values(argv)
  return holder.value


def run_train(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-X", "importtime", "train.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def heavy_imports(stderr: str) -> list[str]:
  """Modules from HEAVY_MODULES that `python -X importtime` reports as imported."""
  names = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines()
           if line.startswith("import time:")]
  return [n for n in names if n in HEAVY_MODULES or n.startswith(tuple(
      m + "." for m in HEAVY_MODULES))]


def user_lines(stderr: str) -> str:
  return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_has_required_keys_and_types(name, tmp_path):
  config = get_config(name, config_arg(name, tmp_path))
  for key, expected in config_utils.REQUIRED_KEYS.items():
    value = config_utils.get_path(config, key)
    assert isinstance(value, expected) and not isinstance(value, bool), (key, value)
  assert set(config.mesh.axes) == {"data", "fsdp", "tensor"}
  assert all(isinstance(size, int) for size in config.mesh.shape)
  assert all(isinstance(w, float) for w in config.data.tasks.values())
  config_utils.validate(config)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_files_only_change_base_keys(name, tmp_path):
  def keys(tree, prefix=""):
    found = set()
    for key, value in tree.items():
      path = prefix + key
      if isinstance(value, ml_collections.ConfigDict) and path not in (
          "data.tasks", "data.templates", "data.tfds_names", "model.encoder.random_init",
          "model.decoder.random_init"):
        found |= keys(value, path + ".")
      else:
        found.add(path)
    return found

  assert keys(get_config(name, config_arg(name, tmp_path))) == keys(config_utils.base_config())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_stage_of_the_demo_recipe_validates(stage):
  config = get_config("demo_long.py", f"stage={stage}")
  config_utils.validate(config)
  assert config.model.tokens_per_chunk == config.data.chunk_tokens  # pooling `tokens`
  with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
    get_config("demo_long.py", "stage=4")


def test_tiny_is_random_init_and_paper_configs_need_paths(tmp_path):
  tiny = get_config("tiny.py")
  assert tiny.model.encoder.path is None and tiny.model.encoder.random_init.num_layers == 2
  assert tiny.model.decoder.random_init.hidden_size == 64
  for name in PAPER_CONFIGS:
    with pytest.raises(ValueError, match=r"model\.encoder\.path is not set"):
      config_utils.validate(get_config(name))
    config = get_config(name, f"encoder={tmp_path},decoder={tmp_path}/x")
    assert config.model.decoder.path == f"{tmp_path}/x"
    assert config.model.compute_dtype == "bfloat16" and config.model.remat
    assert (config.optim.lr, config.train.batch_size, config.model.tokens_per_chunk) == (
        1e-4, 12, 1)
    with pytest.raises(ValueError, match="does not exist"):
      config_utils.validate(config)
    with pytest.raises(ValueError, match="encoderr"):
      get_config(name, "encoderr=/x")


def test_overrides_reach_the_config():
  config = parse(["train.py", "--config=configs/tiny.py", "--config.optim.lr=0.5",
                  "--config.mesh.shape=2,-1,1", "--config.data.tasks.passkey=0.25",
                  "--config.model.decoder.random_init.num_layers=3",
                  "--config.mesh.rules=(('batch', 'data'), ('embed', None))"])
  assert config.optim.lr == 0.5
  assert config.mesh.shape == (2, -1, 1)
  assert config.data.tasks.passkey == 0.25
  assert config.model.decoder.random_init.num_layers == 3
  assert config.mesh.rules == (("batch", "data"), ("embed", None))
  assert config.train.steps == 20  # untouched keys keep the file's values
  config_utils.validate(config)


def test_misspelled_override_fails_fast_naming_the_key():
  result = run_train("--config=configs/tiny.py", "--workdir=unused", "--config.optim.lrr=1")
  assert result.returncode != 0
  message = user_lines(result.stderr)
  assert "--config.optim.lrr" in message and "did you mean 'lr'" in message
  assert "Traceback" not in message and len(message.splitlines()) == 1
  assert heavy_imports(result.stderr) == []


def test_wrong_type_fails_fast_naming_the_key():
  result = run_train("--config=configs/tiny.py", "--workdir=unused", "--config.train.steps=abc")
  assert result.returncode != 0
  message = user_lines(result.stderr)
  assert "--config.train.steps=abc" in message and "Traceback" not in message
  assert heavy_imports(result.stderr) == []


def test_unset_paper_path_fails_fast_with_the_fix():
  result = run_train("--config=configs/paper_gte_llama2_7b.py", "--workdir=unused")
  assert result.returncode != 0
  message = user_lines(result.stderr)
  assert "model.encoder.path is not set" in message and "--config.model.encoder.path" in message
  assert "Traceback" not in message
  assert heavy_imports(result.stderr) == []


def test_parse_config_arg_types_and_errors():
  parsed = config_utils.parse_config_arg("steps=5,path=/a/b.c,flag=true,lr=0.5", steps=1,
                                         path=None, flag=False, lr=1.0)
  assert (parsed.steps, parsed.path, parsed.flag, parsed.lr) == (5, "/a/b.c", True, 0.5)
  assert config_utils.parse_config_arg(None, steps=1).steps == 1
  with pytest.raises(ValueError, match="steps='x': expected int"):
    config_utils.parse_config_arg("steps=x", steps=1)
  with pytest.raises(ValueError, match="'stepz=1'"):
    config_utils.parse_config_arg("stepz=1", steps=1)


def test_validate_collects_problems():
  config = config_utils.base_config()
  config.model.encoder.random_init = config_utils.random_tower(64, 16, 1, 2, 32)
  config.model.decoder.random_init = config_utils.random_tower(64, 16, 1, 2, 32)
  config_utils.validate(config)
  config.model.pooling = "max"
  config.mesh.shape = (1, -1, -1)
  config.data.tasks = {"passkey": 0.0}
  with pytest.raises(ValueError) as error:
    config_utils.validate(config)
  assert "model.pooling='max'" in str(error.value)
  assert "mesh.shape" in str(error.value) and "data.tasks" in str(error.value)


@pytest.mark.parametrize("environ,reason", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, "SLURM"),
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),  # one task: a plain run
    ({"SLURM_NTASKS": "4"}, None),  # an allocation without srun: the batch script itself
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
])
def test_distributed_launch_detection(environ, reason):
  found = launch.distributed_launch_reason(environ)
  assert (found is None) if reason is None else (reason in found)


def test_single_process_run_does_not_initialize():
  config = config_utils.base_config()
  assert not launch.maybe_initialize_distributed(config, environ={})
