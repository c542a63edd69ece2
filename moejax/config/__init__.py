"""The configuration: schema (every field and default), start-up validation, resume rules.

  schema.py    `base_config(task)`: every field with its default; which fields are active
  validate.py  `validate(cfg, num_devices)`: section by section, each router family its own options
  resume.py    which fields a resumed run may change; differences from a workdir's config.json
Importing this package imports neither JAX nor Flax, so config files load in milliseconds.
The model dataclasses are built from a config by `moejax.models.build`.
"""

from moejax.config.resume import RESUMABLE_CHANGES, differences, differences_from_saved, saved_config
from moejax.config.schema import base_config, flatten
from moejax.config.validate import mesh_shape, refuse_inactive, validate
from moejax.errors import ConfigError

__all__ = [
  "ConfigError",
  "RESUMABLE_CHANGES",
  "base_config",
  "differences",
  "differences_from_saved",
  "flatten",
  "mesh_shape",
  "override",
  "refuse_inactive",
  "saved_config",
  "validate",
]


def override(config, values: dict):
  """Sets {'section.field': value} on `config` (as --config.section.field=value would); returns it."""
  for key, value in values.items():
    node = config
    *groups, name = key.split(".")
    for group in groups:
      node = node[group]
    node[name] = value
  return config
