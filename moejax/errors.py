"""The error every bad config value raises. Imports nothing from moejax, so any module may use it."""

from __future__ import annotations


class ConfigError(ValueError):
  """A config value that is not allowed; str() is one line naming the field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
