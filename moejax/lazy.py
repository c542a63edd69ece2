"""Modules imported on first use.

Router families (`moejax.routers`) declare their config options next to their JAX code, and the
config schema collects those options when a config file is loaded; that must not start JAX
(loading `configs/quickstart.py` takes milliseconds, and `jax.distributed` must be initialised
before JAX touches a device). Family modules therefore reach JAX through these proxies: the real
module is imported on the first attribute access, i.e. when a model is built, never at config time.
"""

from __future__ import annotations

import importlib


class LazyModule:
  """Stands for the module `name`; `proxy.attr` imports it (once) and returns `module.attr`."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str):
    return getattr(importlib.import_module(self._name), attr)

  def __repr__(self) -> str:
    return f"<lazy module {self._name!r}>"


jax = LazyModule("jax")
jnp = LazyModule("jax.numpy")
nnx = LazyModule("flax.nnx")
