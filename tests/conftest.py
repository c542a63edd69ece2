"""Test setup: 8 fake CPU devices, configured before JAX starts its backend, and compilation caches.

Many tests train the same small models (the quickstart config through the CLI, the same smoke
variants in several experiments), each in a fresh process or with freshly jitted functions.
XLA's persistent compilation cache compiles each distinct program once per pytest worker: the
worker and the subprocesses it starts (which inherit the environment) share one cache. jax writes
cache entries without a lock, so no two processes that run at the same time may share one: each
xdist worker has its own, and tests that start concurrent processes drop it from their
environment (`cli_util.without_compilation_cache`). The cache only skips recompiling identical programs;
what runs is the same. A user's own JAX_COMPILATION_CACHE_DIR is left alone.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE_ROOT = None  # Made by the first process (pytest itself), which removes it at the end.
if "MOEJAX_TEST_XLA_CACHES" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_ROOT = os.environ["MOEJAX_TEST_XLA_CACHES"] = tempfile.mkdtemp(prefix="moejax-test-xla-caches-")
if "MOEJAX_TEST_XLA_CACHES" in os.environ:
  os.environ.update(
    {
      "JAX_COMPILATION_CACHE_DIR": os.path.join(
        os.environ["MOEJAX_TEST_XLA_CACHES"], os.environ.get("PYTEST_XDIST_WORKER", "main")
      ),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
  )

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data directory of the test module's own (datasets prepared once per module)."""
  return str(tmp_path_factory.mktemp("tfds"))


def pytest_unconfigure(config):
  if _CACHE_ROOT and not hasattr(config, "workerinput"):
    shutil.rmtree(_CACHE_ROOT, ignore_errors=True)
