"""Errors a user can cause and fix, and the interruption a signal asks for; shared by every layer.

`cli.run` prints a `UserError` as one line `error: <what is wrong>; <how to fix it>` (exit code 2).
"""


class UserError(ValueError):
  """A mistake the user can fix (config, paths, data, weights); the message names both.

  A ValueError, so callers that catch bad values keep working.
  """


class ConfigError(UserError):
  """A config value, or a combination of values, that cannot work."""


class DataError(UserError):
  """Training or evaluation data that is missing, empty or unreadable."""


class WeightsError(UserError):
  """Model weights that are missing, of the wrong kind, or not the ones a checkpoint expects."""


class CheckpointError(UserError):
  """A checkpoint that does not fit the current run, or none where one is needed."""


class PromptTooLongError(UserError):
  """A prompt (soft tokens included) plus its answer budget that exceeds the decoder's window."""


class Interrupted(Exception):
  """SIGINT / SIGTERM stopped a command; `message` says what was saved and how to continue.

  The CLI exits with `128 + signum` (130 for Ctrl-C, 143 for SIGTERM), the shell's convention for
  "stopped by a signal", so a launcher can tell a pre-empted run from a finished one.
  """

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.message = message

  @property
  def exit_code(self) -> int:
    return 128 + self.signum
