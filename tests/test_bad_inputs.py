"""Every user mistake through the CLIs: exit code 2, one `error:` line naming the fix, no
traceback, and the workdir as it was. Each case is its own CLI process; cases run side by side.
"""

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from e2llm_jax import assets
from e2llm_jax.hf import configs, weight_names

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKDIR = "<workdir>"
TIMEOUT_S = 300
PARALLEL = 3

TINY_BERT = {"model_type": "bert", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
             "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
             "pad_token_id": 0}

# configs/tiny.py, with towers from paths and one task from the `:arg` (parse_config_arg).
CONFIG_FILE = '''
import importlib.util
from e2llm_jax import config_utils

def get_config(arg=None):
  args = config_utils.parse_config_arg(arg, encoder="", decoder="", task="", jsonl="",
                                       data_dir="", skip=False)
  spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for tower in ("encoder", "decoder"):
    if args[tower]:
      c.model[tower].path = args[tower]
      c.model[tower].random_init = None
  if args.task:
    c.data.tasks = {{args.task: 1.0}}
  if args.jsonl:
    c.data.jsonl_files = {{args.task: args.jsonl}}
  if args.data_dir:
    c.data.data_dir = args.data_dir
  c.data.skip_bad_lines = args.skip
  return c
'''


def subprocess_environment() -> dict:
  """The session's environment (XLA flags and compilation cache: conftest.py)."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  env.pop("E2LLM_DEBUG", None)
  return env


def _command(tool: str, args: list[str]) -> list[str]:
  entry = {"train": ["train.py"], "eval": ["eval.py"], "ruler": ["-m", "e2llm_jax.data.ruler"]}
  return [sys.executable, *entry[tool], *args]


def listing(path: pathlib.Path) -> dict[str, int] | None:
  """Every file under `path` with its size (None if `path` does not exist)."""
  if not path.exists():
    return None
  if path.is_file():
    return {"": path.stat().st_size}
  return {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}


def write_bert(folder: pathlib.Path, seed: int, drop: str | None = None,
                reshape: str | None = None) -> pathlib.Path:
  """A tiny random BERT in HF layout (config.json + model.safetensors), optionally broken."""
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(TINY_BERT))
  cfg = configs.encoder_config_from_hf(TINY_BERT)
  rng = np.random.default_rng(seed)
  tensors = {name: rng.normal(0, 0.02, spec.hf_shape).astype(np.float32)
             for name, spec in weight_names.encoder_weight_map(cfg).items() if name != drop}
  if reshape:
    tensors[reshape] = tensors[reshape][..., :-1].copy()
  save_file(tensors, str(folder / "model.safetensors"))
  return folder


@pytest.fixture(scope="module")
def env():
  return subprocess_environment()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Model folders (good and broken), data files and the test config file."""
  root = tmp_path_factory.mktemp("inputs")
  f = {"root": root, "config": root / "cfg.py"}
  f["config"].write_text(CONFIG_FILE.format(tiny=str(ROOT / "configs" / "tiny.py")))
  f["bert"] = write_bert(root / "bert", seed=0)
  cfg = configs.encoder_config_from_hf(TINY_BERT)
  names = list(weight_names.encoder_weight_map(cfg))
  f["missing_name"] = names[3]
  f["bert_missing"] = write_bert(root / "bert_missing", seed=0, drop=names[3])
  f["misshaped_name"] = "embeddings.word_embeddings.weight"
  f["bert_misshaped"] = write_bert(root / "bert_misshaped", seed=0,
                                    reshape="embeddings.word_embeddings.weight")
  f["no_weights"] = root / "no_weights"
  f["no_weights"].mkdir()
  (f["no_weights"] / "config.json").write_text(json.dumps(TINY_BERT))
  f["pickle"] = root / "pickle"
  f["pickle"].mkdir()
  (f["pickle"] / "config.json").write_text(json.dumps(TINY_BERT))
  (f["pickle"] / "pytorch_model.bin").write_bytes(b"not read")
  f["gpt2"] = root / "gpt2"
  f["gpt2"].mkdir()
  (f["gpt2"] / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
  (f["gpt2"] / "model.safetensors").write_bytes(b"not read")
  f["gguf_file"] = root / "model.gguf"
  f["gguf_file"].write_bytes(b"GGUF not read")
  f["a_file"] = root / "a_file"
  f["a_file"].write_text("I am a file")
  jsonl = {
      "non_utf8": b'{"context": "a b c", "prompt": "q", "answer": "x"}\n'
                  b'{"context": "caf\xe9", "prompt": "q", "answer": "y"}\n',
      "all_bad": b'{"context": "caf\xe9", "prompt": "q", "answer": "y"}\n',
      "empty": b"",
      "bad_json": b'{"context": "a", "prompt": \n',
      "blank_context": b'{"context": "   ", "prompt": "q", "answer": "x"}\n',
  }
  for name, content in jsonl.items():
    f[name] = root / f"{name}.jsonl"
    f[name].write_bytes(content)
  f["empty_dir"] = root / "empty_data_dir"
  f["empty_dir"].mkdir()
  f["minilm"], f["smollm2"] = assets.minilm_dir(), assets.smollm2_gguf()
  return f


def _case_table(f) -> dict[str, tuple]:
  """name → (tool, arguments, words the error must contain, its own new workdir)."""
  w = WORKDIR
  cfg, tiny = str(f["config"]), "--config=configs/tiny.py"
  text = f"encoder={f['minilm']},decoder={f['smollm2']}"

  def jsonl(name, skip=False, data_dir=None):
    return [f"--config={cfg}:{text},task=mine,jsonl={f[name]},data_dir={data_dir or f['root']}"
            f"{',skip=true' if skip else ''}", f"--workdir={w}"]

  def train(*args):
    return ("train", [tiny, f"--workdir={w}", *args])

  cases = {
      # Config values: caught while parsing, before JAX is imported.
      "misspelled_key": (*train("--config.optim.lrr=1"),
                         ["--config.optim.lrr", "did you mean 'lr'"]),
      "wrong_type": (*train("--config.train.steps=abc"), ["--config.train.steps=abc"]),
      "negative_lr": (*train("--config.optim.lr=-0.001"), ["optim.lr=-0.001", "positive"]),
      "zero_lr": (*train("--config.optim.lr=0.0"), ["optim.lr=0.0", "positive"]),
      "zero_steps": (*train("--config.train.steps=0"), ["train.steps=0", "at least 1"]),
      "zero_batch": (*train("--config.train.batch_size=0"), ["train.batch_size=0"]),
      "bad_pooling": (*train("--config.model.pooling=max"), ["model.pooling='max'", "pma"]),
      "tokens_per_chunk_needs_pma": (*train("--config.model.pooling=cls"),
                                     ["model.tokens_per_chunk=2", "pma"]),
      "overlap_too_big": (*train("--config.data.chunk_overlap=16"),
                          ["data.chunk_overlap=16", "below"]),
      "two_minus_ones": (*train("--config.mesh.shape=-1,-1,1"), ["mesh.shape", "-1"]),
      "no_loss": (*train("--config.loss.recon_weight=0.0", "--config.loss.ift_weight=0.0"),
                  ["loss.recon_weight", "nothing would be learned"]),
      "dropout_above_one": (*train("--config.lora.dropout=1.5"), ["lora.dropout=1.5"]),
      "beta_one": (*train("--config.optim.b2=1.0"), ["optim.b2=1.0", "[0, 1)"]),
      "recon_window_too_big": (*train("--config.data.recon_window=9"),
                               ["data.recon_window=9", "data.max_chunks=4"]),
      "microbatches_indivisible": (*train("--config.train.microbatches=3"),
                                   ["train.batch_size=8", "train.microbatches=3"]),
      "heads_indivisible": (*train("--config.model.decoder.random_init.num_heads=3"),
                            ["num_heads=3", "not divisible"]),
      "only_recon": (*train("--config.data.tasks.passkey=0.0"), ["only 'recon'"]),
      "negative_task_weight": (*train("--config.data.tasks.passkey=-1.0"), ["data.tasks"]),
      "extra_argument": (*train("oops"), ["unexpected arguments", "oops"]),
      "paper_path_unset": ("train", ["--config=configs/paper_gte_llama2_7b.py", f"--workdir={w}"],
                           ["model.encoder.path is not set", "--config.model.encoder.path"]),
      "path_does_not_exist": ("train", [f"--config={cfg}:encoder={f['root']}/nope",
                                        f"--workdir={w}"], ["nope", "does not exist"]),
      "config_file_missing": ("train", ["--config=configs/nope.py", f"--workdir={w}"],
                              ["configs/nope.py", "no such config file"]),
      "unknown_flag": (*train("--stepz=3"), ["stepz"]),
      "bad_config_argument": ("train", [f"--config={cfg}:encoderr=x", f"--workdir={w}"],
                              ["encoderr=x", "NAME=VALUE"]),
      # Paths, sizes and devices: pre-flight, before weights load or anything is written.
      "workdir_is_a_file": ("train", [tiny, f"--workdir={f['a_file']}"], ["is a file"]),
      "workdir_under_a_file": ("train", [tiny, f"--workdir={f['a_file']}/run"],
                               ["is a file", "cannot be created"]),
      "chunk_longer_than_encoder": (*train("--config.data.chunk_tokens=1024"),
                                    ["data.chunk_tokens=1024", "512 positions"]),
      "sequence_longer_than_decoder": (*train("--config.data.target_tokens=4000"),
                                       ["4000", "2048 positions", "data.max_chunks"]),
      "mesh_not_dividing_devices": (*train("--config.mesh.shape=3,-1,1"),
                                    ["mesh.shape=(3, -1, 1)", "8"]),
      "batch_not_divisible": (*train("--config.train.batch_size=6"),
                              ["train.batch_size=6", "not divisible", "8 devices"]),
      "data_dir_missing": (*train("--config.data.data_dir=/nonexistent/data"),
                           ["data.data_dir", "not a folder"]),
      "text_task_on_random_towers": ("train", [f"--config={cfg}:task=niah_single_1",
                                               f"--workdir={w}"], ["text tasks", "random-init"]),
      "unknown_dataset_without_data_dir": ("train", [f"--config={cfg}:{text},task=mydata",
                                                     f"--workdir={w}"],
                                           ["mydata", "set data.data_dir"]),
      "tfds_dataset_not_built": ("train", [f"--config={cfg}:{text},task=mydata,"
                                           f"data_dir={f['empty_dir']}", f"--workdir={w}"],
                                 ["'mydata'", "not built", "data.data_dir"]),
      # Weights of the wrong kind.
      "folder_without_weights": ("train", [f"--config={cfg}:encoder={f['no_weights']}",
                                           f"--workdir={w}"], ["model.safetensors", "no_weights"]),
      "pickle_only": ("train", [f"--config={cfg}:encoder={f['pickle']}", f"--workdir={w}"],
                      ["pytorch_model.bin", "safe_serialization=True", "pickle"]),
      "gpt2_as_encoder": ("train", [f"--config={cfg}:encoder={f['gpt2']}", f"--workdir={w}"],
                          ["model_type 'gpt2' is not supported"]),
      "gpt2_as_decoder": ("train", [f"--config={cfg}:decoder={f['gpt2']}", f"--workdir={w}"],
                          ["model_type 'gpt2' is not supported"]),
      "gguf_as_encoder": ("train", [f"--config={cfg}:encoder={f['gguf_file']}", f"--workdir={w}"],
                          ["model.gguf", "is a file", "BERT-family folder"]),
      "tensor_missing": ("train", [f"--config={cfg}:encoder={f['bert_missing']}",
                                   f"--workdir={w}"], ["missing (1)", f["missing_name"]]),
      "tensor_misshaped": ("train", [f"--config={cfg}:encoder={f['bert_misshaped']}",
                                     f"--workdir={w}"], ["mis-shaped", f["misshaped_name"]]),
      # Data files.
      "jsonl_not_utf8": ("train", jsonl("non_utf8"), ["non_utf8.jsonl, line 2", "not UTF-8",
                                                      "data.skip_bad_lines=True"]),
      "jsonl_all_lines_skipped": ("train", jsonl("all_bad", skip=True),
                                  ["all_bad.jsonl holds no records", "1 bad lines were skipped"]),
      "jsonl_empty": ("train", jsonl("empty"), ["empty.jsonl holds no records"]),
      "jsonl_bad_json": ("train", jsonl("bad_json"), ["bad_json.jsonl, line 1", "not valid JSON"]),
      "jsonl_blank_context": ("train", jsonl("blank_context"),
                              ["blank_context.jsonl, line 1", "context is empty"]),
      "jsonl_missing": ("train", [f"--config={cfg}:{text},task=mine,jsonl={f['root']}/nope.jsonl,"
                                  f"data_dir={f['root']}", f"--workdir={w}"],
                        ["data.jsonl_files.mine", "nope.jsonl", "does not exist"]),
      "jsonl_without_data_dir": ("train", [f"--config={cfg}:{text},task=mine,jsonl={f['empty']}",
                                           f"--workdir={w}"],
                                 ["data.jsonl_files", "data.data_dir is not set"]),
      # eval.py and the RULER CLI.
      "eval_empty_workdir": ("eval", [tiny, f"--workdir={f['empty_dir']}"],
                             ["holds no checkpoint", "python train.py"]),
      "eval_missing_workdir": ("eval", [tiny, f"--workdir={w}"], ["does not exist"]),
      "ruler_length_too_short": ("ruler", ["--task", "niah_single_1", "--max-seq-length", "10",
                                           "--tokenizer", str(f["smollm2"]), "--out",
                                           f"{w}/niah.jsonl"],
                                 ["max_seq_length=10", "reserves 128", "above 128"]),
      "ruler_tokenizer_missing": ("ruler", ["--task", "niah_single_1", "--max-seq-length", "4096",
                                            "--tokenizer", f"{f['root']}/no_tokenizer", "--out",
                                            f"{w}/niah.jsonl"], ["no_tokenizer", "does not exist"]),
      "ruler_unknown_task": ("ruler", ["--task", "niah_9", "--max-seq-length", "4096",
                                       "--tokenizer", str(f["smollm2"]), "--out", f"{w}/x.jsonl"],
                             ["invalid choice: 'niah_9'"]),
      "ruler_all_into_a_file": ("ruler", ["--task", "all", "--max-seq-length", "4096",
                                          "--tokenizer", str(f["smollm2"]), "--out",
                                          f"{w}/x.jsonl"], ["--out must be a folder"]),
      "ruler_zero_samples": ("ruler", ["--task", "vt", "--max-seq-length", "4096", "--tokenizer",
                                       str(f["smollm2"]), "--out", f"{w}/x.jsonl",
                                       "--num-samples", "0"], ["--num-samples=0"]),
  }
  table = {}
  for name, (tool, args, words) in cases.items():
    workdir = f["root"] / "work" / name  # one per case: cases run side by side
    table[name] = (tool, [a.replace(WORKDIR, str(workdir)) for a in args], words, workdir)
  return table


def _run(tool: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
  return subprocess.run(_command(tool, args), cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def results(files, env):
  """Every case of the table, run side by side (each in its own process)."""
  table = _case_table(files)
  def timed(tool, args):
    start = time.monotonic()
    result = _run(tool, args, env)
    result.seconds = time.monotonic() - start
    return result

  with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
    futures = {name: pool.submit(timed, tool, args) for name, (tool, args, _, _) in table.items()}
    outcomes = {name: future.result() for name, future in futures.items()}
  if os.environ.get("E2LLM_TEST_TIMES"):
    print({name: round(r.seconds, 1) for name, r in outcomes.items()})
  return table, outcomes


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_clean_user_error(result: subprocess.CompletedProcess, words: list[str]) -> None:
  stderr = result.stderr
  assert result.returncode == 2, (result.returncode, stderr[-3000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = error_lines(stderr)
  assert len(lines) == 1, stderr[-3000:]
  for word in words:
    assert word in lines[0], (word, lines[0])


class _AnyFiles(dict):
  def __missing__(self, key):
    return pathlib.Path("/unused")


CASE_NAMES = sorted(_case_table(_AnyFiles()))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_user_error_is_one_clean_line_and_leaves_nothing(name, results):
  table, outcomes = results
  _, _, words, workdir = table[name]
  assert_clean_user_error(outcomes[name], words)
  assert listing(workdir) is None, f"{workdir} was left behind: {listing(workdir)}"


def test_there_are_at_least_forty_kinds():
  assert len(CASE_NAMES) >= 40


def test_debug_shows_the_traceback(files, env):
  args = ["--config=configs/tiny.py", f"--workdir={files['a_file']}"]
  for extra_args, extra_env in (([], {}), (["--debug"], {}), ([], {"E2LLM_DEBUG": "1"})):
    result = _run("train", args + extra_args, {**env, **extra_env})
    assert result.returncode == 2 and "is a file" in error_lines(result.stderr)[0]
    assert ("Traceback" in result.stderr) == bool(extra_args or extra_env), result.stderr[-2000:]


# A CLI through `cli.run` that creates a folder, then writes far more than a pipe holds.
PIPED_CLI = '''
import os
from e2llm_jax import cli

def main(argv):
  out, = argv
  cli.remove_on_failure(out)
  os.makedirs(out)
  for i in range(10 ** 6):
    print("line", i)

cli.run(main)
'''


def test_closed_output_pipe_stops_quietly_and_leaves_nothing(tmp_path):
  out = tmp_path / "out"
  process = subprocess.Popen([sys.executable, "-c", PIPED_CLI, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=ROOT)
  assert process.stdout.readline().startswith(b"line 0")
  process.stdout.close()  # as `| head -1` does: the rest has no reader
  stderr = process.stderr.read().decode()
  assert process.wait(timeout=TIMEOUT_S) == 128 + 13, stderr  # 13: SIGPIPE
  assert stderr == "", stderr
  assert not out.exists()
