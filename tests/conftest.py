"""Test setup: 8 fake CPU devices, configured before JAX starts its backend, and one compilation cache.

Many tests train the same small models (the quickstart config through the CLI, the same smoke
variants in several experiments), each in a fresh process or with freshly jitted functions.
XLA's persistent compilation cache, shared by the pytest workers and the subprocesses they
start (through the environment), compiles each distinct program once per session. It only
skips recompiling identical programs; what runs is the same.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:  # The first process (pytest itself, before its workers start) makes it.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moejax-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
