"""Kill anywhere: SIGKILL at random moments (one during an async checkpoint write), SIGTERM, a
damaged newest checkpoint; the same command then resumes to bitwise the parameters of an
uninterrupted run (CPU; tiny config, encoder from a folder; train.py as a subprocess). That run's
checkpoint then refuses other base weights and another LoRA rank.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_bad_inputs import (CONFIG_FILE, assert_clean_user_error, error_lines, listing,
                             subprocess_environment, write_bert)

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 16, 2
KILLS = 5
TIMEOUT_S = 300
TMP_MARKER = ".orbax-checkpoint-tmp"
ARGS = [f"--config.train.steps={STEPS}", f"--config.ckpt.every_steps={EVERY}",
        "--config.ckpt.keep=2", "--config.train.eval_examples=0", "--config.train.log_every=1"]


def _start(workdir: pathlib.Path, env: dict, log: pathlib.Path,
           encoder: pathlib.Path | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
  config = env["TEST_CONFIG"] + f":encoder={encoder or env['TEST_ENCODER']}"
  return subprocess.Popen([sys.executable, "train.py", f"--config={config}", *ARGS, *extra,
                           f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=open(log, "w"))


def _finish(process: subprocess.Popen, log: pathlib.Path) -> tuple[int, str]:
  code = process.wait(timeout=TIMEOUT_S)
  return code, log.read_text()


def logged_steps(log: pathlib.Path) -> int:
  """The last `step N/` progress line a run has printed (0 before the first)."""
  steps = [int(line.split()[1].split("/")[0]) for line in log.read_text().splitlines()
           if line.startswith("step ") and "/" in line.split()[1]]
  return max(steps, default=0)


def saved_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def saving_now(workdir: pathlib.Path) -> bool:
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(TMP_MARKER in p.name for p in folder.iterdir())


def _wait_until(condition, process: subprocess.Popen, poll_s: float) -> bool:
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline and process.poll() is None:
    if condition():
      return True
    time.sleep(poll_s)
  return False


def trainable(workdir: pathlib.Path, step: int) -> dict:
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state["trainable"])}


def losses(workdir: pathlib.Path) -> dict[int, float]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {record["step"]: record["loss"] for record in map(json.loads, lines)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("towers")
  (root / "cfg.py").write_text(CONFIG_FILE.format(tiny=str(ROOT / "configs" / "tiny.py")))
  write_bert(root / "bert_other", seed=1)  # same shapes, other values
  return {**subprocess_environment(), "PYTHONUNBUFFERED": "1",
          "TEST_CONFIG": str(root / "cfg.py"), "TEST_ENCODER": str(write_bert(root / "bert", 0))}


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """An uninterrupted run (it also fills the compilation cache for the others)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  log = workdir.parent / "log.txt"
  code, text = _finish(_start(workdir, env, log), log)
  assert code == 0, text[-3000:]
  return workdir


def test_sigkill_anywhere_sigterm_and_damage_then_resume_bitwise(env, reference, tmp_path):
  rng = random.Random(1234)
  workdir = tmp_path / "run"
  outcomes = []

  # 1. One SIGKILL while an asynchronous checkpoint write is in flight (a tmp folder exists).
  for attempt in range(3):
    log = tmp_path / f"save_{attempt}.txt"
    process = _start(workdir, env, log)
    caught = _wait_until(lambda: saving_now(workdir), process, poll_s=0.0005)
    process.kill()
    _finish(process, log)
    if caught and saving_now(workdir):  # the write was cut: its tmp folder is left behind
      outcomes.append(("SIGKILL during async save", saved_steps(workdir)))
      break
  else:
    pytest.fail("no checkpoint write was caught in flight in 3 runs")
  assert all(TMP_MARKER not in str(s) for s in saved_steps(workdir))

  # 2. SIGKILLs at random moments: after a random logged step, plus a random delay.
  for kill in range(KILLS - 1):
    log = tmp_path / f"kill_{kill}.txt"
    before = max(saved_steps(workdir), default=0)
    target = rng.randint(min(before + 1, STEPS - 4), STEPS - 4)
    process = _start(workdir, env, log)
    _wait_until(lambda: logged_steps(log) >= target, process, poll_s=0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    process.kill()
    code, text = _finish(process, log)
    assert code == -signal.SIGKILL, text[-2000:]
    assert "Traceback" not in text
    outcomes.append((f"SIGKILL after step {logged_steps(log)}", saved_steps(workdir)))
    # Never more lost than the steps since the newest complete checkpoint, which is readable.
    assert saved_steps(workdir) and max(saved_steps(workdir)) >= before

  # 3. SIGTERM (pre-emption): saves the current step, says where, exits 128 + 15.
  log = tmp_path / "term.txt"
  target = rng.randint(min(max(saved_steps(workdir)) + 1, STEPS - 2), STEPS - 2)
  process = _start(workdir, env, log)
  assert _wait_until(lambda: logged_steps(log) >= target, process, poll_s=0.005)
  process.send_signal(signal.SIGTERM)
  code, text = _finish(process, log)
  stopped_at = logged_steps(log)
  assert code == 128 + signal.SIGTERM, text[-2000:]
  assert "Traceback" not in text
  assert f"checkpoint saved in {workdir / 'checkpoints' / str(stopped_at)}" in text, text[-2000:]
  assert "re-run the same command to resume" in text
  assert max(saved_steps(workdir)) == stopped_at
  outcomes.append((f"SIGTERM after step {stopped_at}", saved_steps(workdir)))

  # 4. Damage the newest step (truncate its largest state file): it is named, set aside, and the
  #    previous complete step is used.
  damaged, previous = saved_steps(workdir)[-1], saved_steps(workdir)[-2]
  state_files = sorted((workdir / "checkpoints" / str(damaged) / "state").rglob("*"),
                       key=lambda p: p.stat().st_size if p.is_file() else -1)
  os.truncate(state_files[-1], 16)

  # 5. The same command finishes the run.
  log = tmp_path / "final.txt"
  code, text = _finish(_start(workdir, env, log), log)
  assert code == 0, text[-3000:]
  assert f"checkpoint step {damaged} in {workdir / 'checkpoints'} is damaged" in text, text[-3000:]
  assert (workdir / "checkpoints" / f"{damaged}.damaged").is_dir()
  assert f"step {previous + 1}/{STEPS}" in text  # resumed right after the previous good step
  outcomes.append((f"damaged step {damaged}, resumed from {previous}", saved_steps(workdir)))

  expected, got = trainable(reference, STEPS), trainable(workdir, STEPS)
  assert expected.keys() == got.keys()
  for name in expected:
    assert expected[name].dtype == got[name].dtype
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)  # bitwise on CPU
  assert losses(workdir) == losses(reference)
  print(outcomes)


def test_damaged_only_checkpoint_stops_with_one_line(env, reference, tmp_path):
  """Every checkpoint damaged: nothing silently restarts from scratch; the error names them."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  source = reference / "checkpoints" / str(STEPS)
  subprocess.run(["cp", "-r", str(source), str(workdir / "checkpoints" / str(STEPS))], check=True)
  (workdir / "checkpoints" / str(STEPS) / "meta" / "metadata").unlink()
  log = tmp_path / "log.txt"
  code, text = _finish(_start(workdir, env, log), log)
  assert code == 2 and "Traceback" not in text, text[-3000:]
  assert f"checkpoint step {STEPS} in {workdir / 'checkpoints'} is damaged" in text
  errors = [line for line in text.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "every checkpoint" in errors[0] and f"[{STEPS}]" in errors[0]


def test_resume_on_other_base_weights_names_both_fingerprints(env, reference, tmp_path):
  before = listing(reference)
  other = pathlib.Path(env["TEST_ENCODER"]).parent / "bert_other"
  log = tmp_path / "log.txt"
  code, text = _finish(_start(reference, env, log, encoder=other), log)
  result = subprocess.CompletedProcess([], code, "", text)
  assert_clean_user_error(result, ["Base weights differ", env["TEST_ENCODER"], str(other)])
  assert error_lines(text)[0].count("sha256:") == 2
  assert listing(reference) == before


def test_resume_with_another_lora_rank_names_the_mismatch(env, reference, tmp_path):
  before = listing(reference)
  log = tmp_path / "log.txt"
  code, text = _finish(_start(reference, env, log, extra=("--config.lora.decoder_rank=2",)), log)
  assert_clean_user_error(subprocess.CompletedProcess([], code, "", text),
                          ["does not fit", "LoRA ranks"])
  assert listing(reference) == before
