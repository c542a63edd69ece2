"""Test setup: 8 fake CPU devices, configured before JAX starts its backend, and one compilation cache.

Many tests train the same small models (the quickstart config through the CLI, the same smoke
variants in several experiments), each in a fresh process or with freshly jitted functions.
XLA's persistent compilation cache, shared by the pytest workers and the subprocesses they
start (through the environment), compiles each distinct program once per session. It only
skips recompiling identical programs; what runs is the same.
"""

import importlib.util
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE_DIR = None  # Set in the first process only, the one that removes it at the end.
# A user's own cache is left alone. With a size limit jax locks the cache with `filelock` (a test
# extra), so that concurrent processes never read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and importlib.util.find_spec("filelock"):
  _CACHE_DIR = tempfile.mkdtemp(prefix="moejax-test-xla-cache-")
  os.environ.update({"JAX_COMPILATION_CACHE_DIR": _CACHE_DIR, "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_unconfigure(config):
  if _CACHE_DIR and not hasattr(config, "workerinput"):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
