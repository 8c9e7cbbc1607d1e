"""User-facing errors: the CLI prints these as one line, never as a traceback."""

# What absl/ml_collections raise for a bad flag, config file or override.
import signal

from absl import flags

PARSE_ERRORS = (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError)


class UserError(Exception):
  """A mistake the user can fix (bad flag, config, path or input)."""


class ConfigError(UserError):
  """A config that cannot work; the message names the offending field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config.{field}: {message}")
    self.field = field


def one_line(e: BaseException) -> str:
  """An exception's message on one line, unwrapping the KeyError that a config typo raises."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(line.strip() for line in str(text).splitlines() if line.strip()) or type(e).__name__


class Stopped(Exception):
  """Long work (training) stopped on a signal (SIGINT or SIGTERM) after saving where it was;
  running the same command again resumes it."""

  def __init__(self, signum: int, step: int, saved: bool):
    self.signum, self.step, self.saved = signum, step, saved
    name = signal.Signals(signum).name
    super().__init__(f"{name}: stopped after step {step}, checkpoint saved" if saved else
                     f"{name}: stopped before step {step + 1}; nothing new to save")
