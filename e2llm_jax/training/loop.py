"""The training loop: data → jitted step → metrics, checkpoints, periodic held-out evaluation, resume.

`train(config, workdir)` is what train.py runs; re-running it on the same workdir resumes exactly.
"""

import dataclasses
import pathlib
import signal
import sys
import threading

import jax
import numpy as np

from e2llm_jax import checkpoint, config_utils, errors, sharding
from e2llm_jax.data import passkey, pipeline
from e2llm_jax.evaluation import held_out
from e2llm_jax.hf import bundle
from e2llm_jax.models import e2llm
from e2llm_jax.training import reporting, state as state_lib, step as step_lib, warm_start

MODEL_ARRAYS = e2llm.BATCH_KEYS + ("chunks_dropped",)


class NonFiniteLossError(errors.UserError, RuntimeError):
  """Training diverged; the message names the intact checkpoint and the settings to change."""


class StopRequest:
  """SIGINT / SIGTERM during training, remembered so the loop can save after the current step.

  Single-process runs only: on a pod the hosts would see the signal at different steps, so there
  Orbax's pre-emption sync point (`Checkpointer.should_save`) decides the step. A second signal
  stops at once.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}

  def install(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of a background job
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    print(f"{signal.Signals(signum).name}: saving a checkpoint after the current step (send it "
          "again to stop at once)", file=sys.stderr, flush=True)

  def uninstall(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def _stop_now(ckpt: checkpoint.Checkpointer, signum: int, step: int, save) -> errors.Interrupted:
  """Save `step` (unless it is saved), wait until it is on disk, and say where it is."""
  save()
  ckpt.wait()
  return errors.Interrupted(
      signum, f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
      f"{ckpt.directory / str(step)}; re-run the same command to resume")


@dataclasses.dataclass
class PasskeyData:
  """The synthetic token-level passkey task behind the same interface as the text pipeline."""
  task: passkey.PasskeyTask
  seed: int
  batch_size: int
  step: int = 0

  def local_batch(self, step: int) -> dict:
    return self.task.process_batch(self.seed, step, self.batch_size, jax.process_index(),
                                   jax.process_count())

  def __next__(self) -> dict:
    batch = self.local_batch(self.step)
    self.step += 1
    return batch

  def held_out_batch(self, index: int, size: int) -> dict:
    return self.task.process_batch(self.seed, index, size, jax.process_index(),
                                   jax.process_count(), held_out=True)

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


def passkey_task(config, model: e2llm.E2LLMConfig) -> passkey.PasskeyTask:
  return passkey.task_from_config(config, min(model.encoder.vocab_size, model.decoder.vocab_size))


def make_data(config, model: e2llm.E2LLMConfig, start_step: int = 0):
  """The run's data source: token-level passkey for random towers, else the text pipeline."""
  if passkey.is_passkey_run(config):
    task = passkey_task(config, model)
    return PasskeyData(task, int(config.seed), int(config.train.batch_size), start_step)
  from e2llm_jax import hf
  return pipeline.make_pipeline(config, hf.load_tokenizer(str(config.model.encoder.path)),
                                hf.load_tokenizer(str(config.model.decoder.path)),
                                start_step=start_step)


def _model_arrays(batch: dict) -> dict:
  return {k: np.asarray(batch[k], np.int32) for k in MODEL_ARRAYS}


def _global(batch: dict, shardings: dict) -> dict:
  return {k: pipeline.global_batch({k: v}, shardings[k])[k] for k, v in batch.items()}


def _base_meta(setup: state_lib.TrainSetup) -> dict:
  return checkpoint.base_weights_meta({name: path or None
                                       for name, path in setup.base_paths.items()})


def _random_frozen(setup: state_lib.TrainSetup):
  """The frozen towers that exist only in memory (random init), which checkpoints must hold."""
  random = {name: setup.frozen[name] for name, path in setup.base_paths.items() if not path}
  return random or None


def restore_latest(ckpt: checkpoint.Checkpointer, setup: state_lib.TrainSetup) -> tuple[int, dict]:
  """Load the newest readable checkpoint into `setup` (on its mesh); returns (step, data state).

  A damaged newest step is reported and set aside, and the one before it is used.
  """
  abstract_state = sharding.abstract_with_shardings(setup.state, setup.state_shardings)
  random = _random_frozen(setup)
  abstract_frozen = None if random is None else sharding.abstract_with_shardings(
      random, {k: setup.frozen_shardings[k] for k in random})
  found = ckpt.restore_newest(abstract_state, abstract_frozen)
  if found is None:
    return 0, {"step": 0}
  step, state, data_state, _, meta, frozen = found
  checkpoint.check_fingerprints(meta, _base_meta(setup))
  setup.state = state
  if frozen is not None:
    setup.frozen = {**setup.frozen, **frozen}
  return step, data_state


def init_trainable_from(source: str, setup: state_lib.TrainSetup) -> int:
  """Replace `setup`'s trainable params by those of the newest checkpoint under `source`; its step.

  `source` is a run folder (or its checkpoints/) or an adapters-only export. The optimizer state
  stays fresh: this starts a new run (a curriculum's next stage) from another run's parameters,
  which may have been trained at other shapes.
  """
  directory = pathlib.Path(source).expanduser()
  if (directory / bundle.E2LLM_CONFIG_FILE).is_file():
    return _init_trainable_from_export(directory, setup)
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())
  if not steps:
    raise errors.CheckpointError(
        f"train.init_from={source!r} holds no checkpoint: point it at a run folder that saved one "
        "(or at its checkpoints/ folder) or at an adapters-only export, or unset it to start "
        "from fresh parameters.")
  other = checkpoint.Checkpointer(directory, 1, len(steps) + 1, async_save=False)
  try:
    abstract = sharding.abstract_with_shardings(setup.state["trainable"],
                                                setup.state_shardings["trainable"])
    random = _random_frozen(setup)
    abstract_frozen = None if random is None else sharding.abstract_with_shardings(
        random, {k: setup.frozen_shardings[k] for k in random})
    trainable, meta, frozen = other.restore_params(steps[-1], abstract, abstract_frozen)
  finally:
    other.close()
  checkpoint.check_fingerprints(meta, _base_meta(setup))
  setup.state = {**setup.state, "trainable": trainable}
  if frozen is not None:
    setup.frozen = {**setup.frozen, **frozen}
  return steps[-1]


def _init_trainable_from_export(export_dir: pathlib.Path, setup: state_lib.TrainSetup) -> int:
  """init_trainable_from for an adapters-only export (its LoRA, pooling head and adapter)."""
  settings = bundle.read_settings(export_dir)
  if settings["kind"] != bundle.ADAPTERS_ONLY:
    raise errors.ConfigError(
        f"train.init_from={str(export_dir)!r} is a full export, whose LoRA is merged into its "
        "towers; start from an adapters-only export (`python -m e2llm_jax.hf.export "
        "--adapters-only`) or from the run folder it was exported from.")
  exported = {"base_weights": {tower: {"path": record.get("path") or record.get("asset"),
                                       "fingerprint": record["fingerprint"]}
                               for tower, record in settings["bases"].items()}}
  checkpoint.check_fingerprints(exported, _base_meta(setup))
  trainable, _ = bundle.read_trained(export_dir, settings, {"encoder": setup.model.encoder,
                                                           "decoder": setup.model.decoder})
  current = setup.state["trainable"]
  shapes = lambda tree: {jax.tree_util.keystr(path): np.shape(leaf)
                         for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  found, expected = shapes(trainable), shapes(current)
  if found != expected:
    differ = sorted(set(found.items()) ^ set(expected.items()))
    raise errors.ConfigError(
        f"train.init_from={str(export_dir)!r}: its trained tensors do not fit this config "
        f"(first differences, name and shape: {differ[:4]}); set model.pooling, "
        "model.tokens_per_chunk, model.adapter_hidden and lora.* as the export records them "
        f"in {bundle.E2LLM_CONFIG_FILE}.")
  trainable = jax.tree.map(lambda leaf, like: np.asarray(leaf, like.dtype), trainable, current)
  setup.state = {**setup.state, "trainable": jax.device_put(
      trainable, setup.state_shardings["trainable"])}
  return int(settings["step"])


def train(config, workdir: str, stop_after: int | None = None) -> dict:
  """Train (or resume) in `workdir`; returns the final held-out evaluation.

  `stop_after` ends this process after that step without saving it, as a crash would; running
  again resumes from the newest checkpoint and continues to `train.steps`.
  """
  config_utils.validate(config)
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  setup = state_lib.create_train_state(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", int(config.ckpt.every_steps),
                                 int(config.ckpt.keep), bool(config.ckpt.async_save))
  start, data_state = restore_latest(ckpt, setup)
  if start == 0 and config.train.get("init_from"):
    step = init_trainable_from(str(config.train.init_from), setup)
    print(f"trainable params from step {step} of {config.train.init_from}", flush=True)
  data = make_data(config, setup.model, start_step=int(data_state.get("step", start)))
  warm_texts = int(config.train.get("adapter_warm_start", 0))
  if start == 0 and warm_texts and not config.train.get("init_from"):
    fitted = warm_start.apply(setup, data, warm_texts)
    print(f"adapter warm start: least squares on {fitted['tokens']} tokens of {warm_texts} chunk "
          f"texts; nearest decoder token {fitted['nearest_token_accuracy']:.3f}", flush=True)
  total = int(config.train.steps)
  first_batch = _model_arrays(next(data))
  train_step = step_lib.make_train_step(config, setup, first_batch)
  batch_shardings = step_lib.batch_shardings_for(config, mesh, first_batch)
  config_json = config_utils.to_json_dict(config)
  meta = _base_meta(setup)
  random_frozen = _random_frozen(setup)  # saved with each checkpoint as they are
  # Every step takes the frozen towers: a CPU's bf16 kernels packed once here, not per step.
  setup.frozen = e2llm.frozen_at_rest(setup.frozen)
  evaluate = held_out.HeldOutEvaluator(config, setup.model, setup.frozen, mesh, data)
  writer = reporting.MetricsWriter(workdir, total, start_step=start)
  writer.write_config(config)
  log_every = max(int(config.train.log_every), 1)
  tokens = 0
  state = setup.state
  first_global = _global(first_batch, batch_shardings)
  if start < total:
    train_step = step_lib.compile_with_memory_report(train_step, state, setup.frozen, first_global)

  def record(done, device_metrics):
    """Read one step's metrics: stop on too many non-finite steps, log every log_every steps."""
    nonlocal tokens
    metrics = jax.device_get(device_metrics)
    tokens += int(metrics["decoder_tokens"]) + int(metrics["encoder_tokens"])
    if int(metrics["bad_steps"]) >= int(config.train.max_bad_steps):
      raise NonFiniteLossError(
          f"{metrics['bad_steps']} consecutive steps ending at step {done} had a non-finite "
          f"loss or gradient; stopped. Checkpoint step {ckpt.latest_step()} in "
          f"{ckpt.directory} is intact: lower optim.lr, raise optim.warmup_steps or use "
          "model.compute_dtype=float32, then re-run to resume from it.")
    if done % log_every == 0 or done == total:
      writer.write(done, metrics, tokens=tokens)
      tokens = 0

  # A step's metrics are read once the next step is dispatched, so the host never idles the
  # device; steps that save, evaluate or stop read theirs at once (their state is needed as is).
  pending = None
  stop = StopRequest().install()
  try:
    for step in range(start, total):
      batch = first_global if step == start else _global(_model_arrays(next(data)),
                                                         batch_shardings)
      state, metrics = train_step(state, setup.frozen, batch)
      done = step + 1
      if pending is not None:
        record(*pending)
        pending = None
      eval_due = bool(config.train.eval_every) and done % int(config.train.eval_every) == 0
      stopping = stop_after is not None and done >= stop_after
      save_due = done == total or ckpt.should_save(done)
      if not (save_due or ((eval_due or stopping) and done < total) or stop.signum is not None):
        pending = (done, metrics)
        continue
      record(done, metrics)
      if eval_due and done < total:
        writer.write_eval(done, evaluate(state["trainable"]))
      if stopping and done < total:
        return {}
      if stop.signum is not None:
        raise _stop_now(ckpt, stop.signum, done, lambda: ckpt.save(
            done, state, data.get_state(), config_json, meta, frozen=random_frozen, force=True))
      if save_due:
        ckpt.save(done, state, data.get_state(), config_json, meta, frozen=random_frozen,
                  force=True)
    setup.state = state
    if int(config.train.eval_examples) <= 0:
      return {}
    result = evaluate(state["trainable"])
    writer.write_eval(total, result)
    return result
  finally:
    stop.uninstall()
    ckpt.close()
    writer.close()
    getattr(data, "close", lambda: None)()
