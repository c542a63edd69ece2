"""The one table of router families: `moe.router` names are looked up here and nowhere else."""

from __future__ import annotations

from moejax.errors import ConfigError

_FAMILIES: dict = {}


def register(family):
  """Class decorator: adds a `RouterFamily` subclass under its `name`.

  An option that two families share must be the same `Option` (one default, one meaning).
  Register before building a config or a model that names the family.
  """
  if not family.name:
    raise ValueError(f"{family.__name__} has no name")
  known = options()
  for option in family.options:
    if option.name in known and known[option.name] != option:
      raise ValueError(
        f"router family {family.name!r} redeclares option moe.{option.name} differently "
        f"({option} vs {known[option.name]}); share the Option object"
      )
  _FAMILIES[family.name] = family
  return family


def get(name: str):
  """The family registered as `name`; ConfigError naming moe.router otherwise."""
  if name not in _FAMILIES:
    raise ConfigError("moe.router", f"{name!r} is not allowed; choose one of {', '.join(map(repr, _FAMILIES))}")
  return _FAMILIES[name]


def names() -> tuple[str, ...]:
  return tuple(_FAMILIES)


def options() -> dict:
  """{name: Option} of every registered family, in registration order."""
  out = {}
  for family in _FAMILIES.values():
    for option in family.options:
      out.setdefault(option.name, option)
  return out


def owners(option_name: str) -> tuple[str, ...]:
  """The families that read `moe.<option_name>`."""
  return tuple(name for name, family in _FAMILIES.items() if any(o.name == option_name for o in family.options))
