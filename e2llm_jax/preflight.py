"""Pre-flight checks: every mistake a user can make is found before weights load or anything is written.

Value ranges of the config (`value_problems`, part of `config_utils.validate`), then, for a run: the
workdir, the towers' files and sizes against the data lengths, the data, and the device mesh.
"""

import math
import os
import pathlib

from e2llm_jax import errors

# Tasks the loop builds itself; any other name in data.tasks is a RULER task or a dataset.
PASSKEY, RECON = "passkey", "recon"
CHECKPOINTS_DIR = "checkpoints"
# Random-init towers without an explicit size get the model defaults (models/bert.py, llama.py).
DEFAULT_ENCODER_POSITIONS, DEFAULT_DECODER_POSITIONS = 512, 2048


def _at_least(config, keys: tuple[str, ...], low: float, problems: list[str], what: str) -> None:
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    if node < low:
      problems.append(f"{key}={node} must be {what}")


def value_problems(config) -> list[str]:
  """Signs and ranges of values whose keys and types `config_utils.validate` already checked."""
  problems: list[str] = []
  optim, lora, loss, data, train = (config.optim, config.lora, config.loss, config.data,
                                    config.train)
  if not optim.lr > 0:
    problems.append(f"optim.lr={optim.lr} must be positive (a negative rate climbs the loss)")
  _at_least(config, ("optim.adapter_lr", "optim.warmup_steps", "optim.weight_decay",
                     "optim.clip_norm", "optim.end_lr_ratio", "loss.recon_weight",
                     "loss.ift_weight", "loss.recon_warmup_steps", "lora.dropout",
                     "data.chunk_overlap", "train.eval_every", "train.eval_examples"),
            0, problems, "non-negative")
  _at_least(config, ("data.recon_window", "data.prefix_tokens", "data.query_tokens",
                     "data.target_tokens", "train.max_bad_steps", "data.ruler_samples",
                     "data.passkey.value_digits", "data.passkey.num_keys", "model.pma_heads"),
            1, problems, "at least 1")
  for key in ("b1", "b2"):
    if not 0 <= optim[key] < 1:
      problems.append(f"optim.{key}={optim[key]} must be in [0, 1)")
  if optim.end_lr_ratio > 1:
    problems.append(f"optim.end_lr_ratio={optim.end_lr_ratio} must be at most 1")
  if lora.dropout >= 1:
    problems.append(f"lora.dropout={lora.dropout} must be below 1")
  for tower in ("encoder", "decoder"):
    if lora[f"{tower}_rank"] > 0 and not lora[f"{tower}_alpha"] > 0:
      problems.append(f"lora.{tower}_alpha={lora[f'{tower}_alpha']} must be positive")
  if loss.recon_weight == 0 and loss.ift_weight == 0:
    problems.append("loss.recon_weight and loss.ift_weight are both 0: nothing would be learned")
  if data.passkey.value_vocab < 2:
    problems.append(f"data.passkey.value_vocab={data.passkey.value_vocab} must be at least 2")
  if data.recon_window > data.max_chunks:
    problems.append(f"data.recon_window={data.recon_window} exceeds data.max_chunks="
                    f"{data.max_chunks}")
  if data.ruler_max_seq_length is not None and data.ruler_max_seq_length < 1:
    problems.append(f"data.ruler_max_seq_length={data.ruler_max_seq_length} must be positive")
  tasks = {name for name, weight in dict(data.tasks).items() if weight > 0}
  if tasks == {RECON} and not data.recon_sources:
    problems.append("data.tasks has only 'recon', which restates other tasks' contexts: add a "
                    "task (e.g. passkey or a RULER task), or name those tasks in "
                    "data.recon_sources")
  for tower in ("encoder", "decoder"):
    sizes = config.model[tower].random_init
    if sizes is not None:
      problems += _random_tower_problems(f"model.{tower}.random_init", dict(sizes))
  return problems


def _random_tower_problems(key: str, sizes: dict) -> list[str]:
  problems = [f"{key}.{name}={value} must be at least 1" for name, value in sizes.items()
              if isinstance(value, int) and value < 1]
  if problems:
    return problems
  if sizes.get("hidden_size", 1) % sizes.get("num_heads", 1):
    problems.append(f"{key}.hidden_size={sizes['hidden_size']} is not divisible by "
                    f"num_heads={sizes['num_heads']}")
  if "num_kv_heads" in sizes and sizes.get("num_heads", 1) % sizes["num_kv_heads"]:
    problems.append(f"{key}.num_heads={sizes['num_heads']} is not divisible by "
                    f"num_kv_heads={sizes['num_kv_heads']}")
  return problems


# -- Paths ----------------------------------------------------------------------------------------

def saved_steps(workdir: str | os.PathLike) -> list[int]:
  """Steps with a complete checkpoint in `workdir` (Orbax renames a step folder once it is whole)."""
  folder = pathlib.Path(workdir).expanduser() / CHECKPOINTS_DIR
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def check_writable_workdir(workdir: str) -> None:
  """The workdir is a folder (or can be made one) that this user can write."""
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise errors.ConfigError(f"--workdir={workdir} is a file, not a folder; pass a folder (it is "
                             "created if missing)")
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise errors.ConfigError(f"--workdir={workdir}: {existing} is a file, so the folder cannot be "
                             "created; pass another path")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.ConfigError(f"--workdir={workdir}: {existing} is not writable by this user; "
                             "pass a folder you can write")


def check_eval_workdir(workdir: str) -> None:
  """Evaluation reads a trained workdir: it must hold a complete checkpoint."""
  path = pathlib.Path(workdir).expanduser()
  if not path.is_dir():
    raise errors.CheckpointError(f"--workdir={workdir} does not exist; pass the workdir of a "
                                 f"training run (python train.py --config=... --workdir=...)")
  if not saved_steps(path):
    raise errors.CheckpointError(
        f"--workdir={workdir} holds no checkpoint (nothing in {path / CHECKPOINTS_DIR}); train "
        f"first with `python train.py --config=... --workdir={workdir}`")


def _readable(path: pathlib.Path, key: str) -> None:
  if not os.access(path, os.R_OK):
    raise errors.ConfigError(f"{key}={str(path)!r} is not readable by this user; fix its "
                             "permissions")


def tower_positions(config, tower: str) -> tuple[int, str]:
  """(maximum positions, where that number comes from) of a tower, reading only its metadata.

  Also stops on a path of the wrong kind (a .gguf as encoder, a folder without config.json or
  weights, pickle-only weights, an unsupported model type) before any weights are read.
  """
  spec = config.model[tower]
  key = f"model.{tower}.path"
  if not spec.path:
    default = DEFAULT_ENCODER_POSITIONS if tower == "encoder" else DEFAULT_DECODER_POSITIONS
    sizes = dict(spec.random_init)
    return int(sizes.get("max_position_embeddings", default)), f"model.{tower}.random_init"
  from e2llm_jax.hf import configs, safetensors_io  # late: only runs that read weights need them

  path = pathlib.Path(spec.path).expanduser()
  _readable(path, key)
  if path.is_file():
    if tower == "encoder" or path.suffix != ".gguf":
      kinds = "a Hugging Face BERT-family folder" if tower == "encoder" else (
          "a Hugging Face folder or a .gguf file")
      raise errors.WeightsError(f"{key}={str(path)!r} is a file; the {tower} must be {kinds} "
                                "(config.json + model.safetensors)")
    from e2llm_jax.hf import gguf

    cfg = gguf.decoder_config_from_gguf(gguf.gguf_reader(path), str(path))
    return int(cfg.max_position_embeddings), str(path)
  hf_config = safetensors_io.read_config(path)
  source = str(path / safetensors_io.CONFIG_FILE)
  read = configs.encoder_config_from_hf if tower == "encoder" else configs.decoder_config_from_hf
  cfg = read(hf_config, source)
  safetensors_io.safetensors_files(path)  # weights present, and safetensors rather than pickle
  return int(cfg.max_position_embeddings), source


def check_lengths(config) -> None:
  """Chunks fit the encoder's positions; prefix + soft tokens + query + target fit the decoder's."""
  data = config.data
  encoder_positions, source = tower_positions(config, "encoder")
  if data.chunk_tokens > encoder_positions:
    raise errors.ConfigError(
        f"data.chunk_tokens={data.chunk_tokens} exceeds the encoder's {encoder_positions} "
        f"positions ({source}); set --config.data.chunk_tokens={encoder_positions} or less")
  decoder_positions, source = tower_positions(config, "decoder")
  soft = data.max_chunks * config.model.tokens_per_chunk
  total = data.prefix_tokens + soft + data.query_tokens + data.target_tokens
  if total > decoder_positions:
    raise errors.ConfigError(
        f"data.prefix_tokens + data.max_chunks x model.tokens_per_chunk + data.query_tokens + "
        f"data.target_tokens = {data.prefix_tokens} + {soft} + {data.query_tokens} + "
        f"{data.target_tokens} = {total} exceeds the decoder's {decoder_positions} positions "
        f"({source}); lower data.max_chunks or data.target_tokens")


def check_data(config) -> None:
  """Data the run names exists: data_dir is a folder, text tasks have tokenizers to read them."""
  data = config.data
  if data.data_dir is not None:
    path = pathlib.Path(data.data_dir).expanduser()
    if not path.is_dir():
      raise errors.DataError(f"data.data_dir={data.data_dir!r} is not a folder; point it at the "
                             "folder the TFDS datasets were built in")
    _readable(path, "data.data_dir")
  text_tasks = [n for n, w in dict(data.tasks).items() if w > 0 and n not in (PASSKEY, RECON)]
  if text_tasks:
    random = [t for t in ("encoder", "decoder") if not config.model[t].path]
    if random:
      raise errors.ConfigError(
          f"data.tasks {text_tasks} are text tasks, which need tokenizers, but "
          f"{' and '.join(f'model.{t}' for t in random)} {'is' if len(random) == 1 else 'are'} "
          "random-init; set model.<tower>.path, or train random towers on data.tasks={passkey, "
          "recon} only")
  from e2llm_jax.data import ruler  # light: the generator's tables only

  jsonl_files = dict(data.jsonl_files)
  if jsonl_files:
    check_jsonl(config, jsonl_files)
  unknown = [n for n in text_tasks if n not in ruler.TASKS and n not in jsonl_files]
  if unknown and data.data_dir is None:
    raise errors.DataError(
        f"data.tasks names {unknown}, which are neither passkey, recon nor RULER tasks (e.g. "
        f"{sorted(ruler.TASKS)[:3]}), so they must be TFDS datasets: set data.data_dir to the "
        "folder they were built in")
  if unknown:
    from e2llm_jax.data import pipeline  # late: TFDS and Grain

    for name in unknown:  # opening a built dataset reads its metadata only
      pipeline.tfds_source(dict(data.tfds_names).get(name, name), str(data.data_dir))


def check_jsonl(config, jsonl_files: dict) -> None:
  """JSONL files exist and read cleanly: they are built into TFDS datasets here, once, so a bad
  line (or encoding) is reported with its file and line before any weights load."""
  data = config.data
  if data.data_dir is None:
    raise errors.ConfigError(f"data.jsonl_files names {sorted(jsonl_files)} but data.data_dir is "
                             "not set; set it to a folder where their datasets can be built")
  used = set(data.tasks) | set(data.recon_sources)
  for task, paths in jsonl_files.items():
    key = f"data.jsonl_files.{task}"
    if task not in used:
      raise errors.ConfigError(f"{key} is set but data.tasks has no task {task!r}; add it to "
                               "data.tasks or remove the files")
    for path in (paths.split(",") if isinstance(paths, str) else paths):
      path = pathlib.Path(path.strip()).expanduser()
      if not path.is_file():
        raise errors.DataError(f"{key}: JSONL file {str(path)!r} does not exist; fix the path")
      _readable(path, key)
  from e2llm_jax.data import pipeline  # late: TFDS and Grain

  for task, paths in jsonl_files.items():
    pipeline.jsonl_source(task, paths, str(data.data_dir), bool(data.skip_bad_lines))


def check_devices(config) -> None:
  """The mesh fits the devices and the global batch splits evenly over its batch axes."""
  import jax  # late: the checks above need no devices

  from e2llm_jax import sharding

  shape, count = list(config.mesh.shape), jax.device_count()
  known = math.prod(s for s in shape if s != -1)
  if (-1 in shape and count % known) or (-1 not in shape and known > count):
    raise errors.ConfigError(
        f"mesh.shape={tuple(shape)} needs {'a multiple of ' if -1 in shape else ''}{known} "
        f"devices, but {count} {jax.devices()[0].platform} device(s) are available; set "
        f"--config.mesh.shape so the sizes multiply to {count} (one entry may be -1, e.g. 1,-1,1)")
  if -1 in shape:
    shape[shape.index(-1)] = count // known
  sizes = dict(zip(config.mesh.axes, shape))
  batch_axes = dict(sharding.normalize_rules(config.mesh.rules)).get("batch", ())
  split = math.prod(sizes.get(axis, 1) for axis in batch_axes)
  if config.train.batch_size % split:
    axes = " x ".join(f"{axis}={sizes.get(axis, 1)}" for axis in batch_axes)
    raise errors.ConfigError(
        f"train.batch_size={config.train.batch_size} is not divisible by the {split} devices the "
        f"batch is split over ({axes} of mesh.shape={tuple(config.mesh.shape)}); use a multiple "
        f"of {split}, or give the other devices to the tensor axis (e.g. mesh.shape=1,-1,2)")


def check_train(config, workdir: str) -> None:
  """What `train.py` can find wrong before JAX starts: workdir, data, towers and lengths.

  `check_devices` follows once JAX (and multi-process start-up) is up.
  """
  check_writable_workdir(workdir)
  check_data(config)
  check_lengths(config)


def check_eval(config, workdir: str) -> None:
  """What `eval.py` can find wrong before JAX starts (then `check_devices`)."""
  check_eval_workdir(workdir)
  check_data(config)
  check_lengths(config)

