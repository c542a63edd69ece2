"""The error every bad config value raises. Imports nothing from moejax, so any module may use it."""

from __future__ import annotations


class ConfigError(ValueError):
  """A config value that is not allowed; str() is one line naming the field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def silence_stderr() -> None:
  """After a refusal's one line on stderr: nothing more reaches it (e.g. a background reader's noise at exit).

  orbax and tensorstore may still have reads in flight when a refusal exits; at interpreter
  shutdown their callbacks can print tracebacks of their own, which would bury the one line.
  """
  import os
  import sys

  sys.stderr.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stderr.fileno())
  os.close(devnull)
