"""The one error path of every command-line tool: user errors as one line, clean-up after a failure.

Usage: `cli.run(main)` (argparse: `main(argv)` gets the arguments after the program name and returns
an exit code or None), or `cli.run(main, flags_parser=...)` for absl tools (train.py, eval.py).
"""

import argparse
import dataclasses
import errno
import os
import pathlib
import select
import shutil
import signal
import sys
import traceback
from typing import Any, Callable, Sequence

from e2llm_jax import errors

DEBUG_FLAG = "--debug"
DEBUG_ENV = "E2LLM_DEBUG"
USER_ERROR_EXIT = 2
BUG_EXIT = 1
# Raised by the OS for paths a user named; their messages name the path.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                  FileExistsError)
OUT_OF_MEMORY_FIX = ("lower train.batch_size, data.max_chunks or data.chunk_tokens, raise "
                     "train.microbatches, or set model.remat=True")


@dataclasses.dataclass
class _Output:
  """A path the command may create, and what it held before (top-level names of a folder)."""
  path: pathlib.Path
  existed: bool
  entries: frozenset
  keep: Callable[[], bool] | None


_outputs: list[_Output] = []
_debug = False


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors take the one error path (`error: ...; see --help`, exit 2)."""

  def error(self, message: str):
    raise errors.UserError(f"{message}; see {self.prog} --help")


def remove_on_failure(path: str | os.PathLike, keep: Callable[[], bool] | None = None) -> None:
  """If the command fails, remove what it created under `path` (call before creating anything).

  A folder that existed keeps its old top-level entries; new ones go. `keep()` returning True
  (e.g. a checkpoint was saved, so the run can resume) keeps everything.
  """
  path = pathlib.Path(path).expanduser().absolute()
  entries = frozenset(os.listdir(path)) if path.is_dir() else frozenset()
  _outputs.append(_Output(path, path.exists(), entries, keep))


def debug_enabled() -> bool:
  return _debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _clean_up() -> None:
  while _outputs:
    output = _outputs.pop()
    try:
      if output.keep is not None and output.keep():
        continue
      if not output.existed:
        _remove(output.path)
      elif output.path.is_dir():
        for name in set(os.listdir(output.path)) - output.entries:
          _remove(output.path / name)
    except OSError as error:  # clean-up must never hide the error that caused it
      print(f"warning: could not remove {output.path}: {error}", file=sys.stderr)


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  elif path.exists() or path.is_symlink():
    path.unlink()


def one_line(text: str) -> str:
  return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_message(error: BaseException) -> str | None:
  """The `error: ...` text for a mistake the user can fix, or None for a bug (traceback)."""
  if isinstance(error, errors.UserError):
    return one_line(error)
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    where = f" writing {error.filename}" if error.filename else ""
    return f"no space left on device{where}; free space or point the output somewhere else"
  if isinstance(error, USER_OS_ERRORS):
    if error.filename is None:  # raised by our code with a full sentence
      return one_line(error)
    reason = (error.strerror or type(error).__name__).lower()
    return f"{error.filename}: {reason}; check the path and its permissions"
  if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)[:2000]:
    first = one_line(str(error).split("\n", 1)[0])[:300]
    return f"out of memory ({first or type(error).__name__}); {OUT_OF_MEMORY_FIX}"
  return None


def _raise_interrupted(signum: int, frame: Any) -> None:
  del frame
  raise errors.Interrupted(signum, f"stopped by {signal.Signals(signum).name}; re-run the same "
                                   "command to continue (training resumes from its newest "
                                   "checkpoint)")


def _stdout_reader_gone() -> bool:
  """Whether standard output is a pipe whose reader has closed it (Linux reports POLLERR)."""
  try:
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(event & select.POLLERR for _, event in poller.poll(0))
  except (AttributeError, OSError, ValueError):  # no poll, or stdout is not a real file
    return False


def call(function: Callable[..., Any], *args: Any) -> Any:
  """`function(*args)`, ending the process the CLI way on a user error, a signal or a bug."""
  try:
    return function(*args)
  except SystemExit:
    raise
  except KeyboardInterrupt:
    _clean_up()
    print("error: interrupted (Ctrl-C); re-run the same command to continue (training resumes "
          "from its newest checkpoint)", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  except errors.Interrupted as stop:
    _clean_up()
    print(stop.message, file=sys.stderr)
    sys.exit(stop.exit_code)
  except Exception as error:  # pylint: disable=broad-except
    if isinstance(error, BrokenPipeError) and _stdout_reader_gone():
      # `... | head` closed our output: stop quietly, as a tool killed by SIGPIPE would. Standard
      # output goes to /dev/null so that the interpreter's last flush does not fail once more.
      _clean_up()
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.exit(128 + signal.SIGPIPE)
    message = user_message(error)
    if message is None or debug_enabled():
      traceback.print_exc()
    _clean_up()
    if message is None:
      print(f"error: unexpected {type(error).__name__} (a bug, please report it with the "
            "traceback above)", file=sys.stderr)
      sys.exit(BUG_EXIT)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def run(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None, *,
        flags_parser: Callable[[Sequence[str]], Any] | None = None) -> None:
  """Run a CLI's `main` under the one error path; never returns.

  `--debug` (removed from the arguments) or `E2LLM_DEBUG=1` also prints the traceback of a user
  error. SIGTERM before the command installs its own handler stops it like Ctrl-C.
  """
  global _debug
  argv = list(sys.argv if argv is None else argv)
  _debug = DEBUG_FLAG in argv[1:]
  argv = [argv[0]] + [arg for arg in argv[1:] if arg != DEBUG_FLAG]
  signal.signal(signal.SIGTERM, _raise_interrupted)
  if flags_parser is None:
    code = call(main, argv[1:])
    sys.exit(code or 0)
  from absl import app  # late: only absl tools need it

  app.run(lambda remaining: call(main, remaining), argv=argv,
          flags_parser=lambda args: call(flags_parser, args))
