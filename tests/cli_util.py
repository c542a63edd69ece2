"""Runs `python -m moejax.main` in a subprocess with a tiny, fast config."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = (
  "--config.model.num_layers=2",
  "--config.model.d_model=32",
  "--config.model.num_heads=2",
  "--config.model.d_ff=64",
  "--config.moe.num_experts=4",
  "--config.moe.top_k=2",
  "--config.train.seq_len=16",
  "--config.train.batch_size=8",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
  "--config.optim.warmup_steps=2",
  "--config.data.markov.vocab_size=16",
  "--config.data.markov.num_train=256",
  "--config.data.markov.num_validation=16",
  "--config.data.num_eval_batches=2",
)


def run_cli(workdir, *overrides, data_dir, config="configs/quickstart.py", env=None, timeout=300, tiny=True):
  """Runs the CLI to completion; returns the CompletedProcess (text output)."""
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  args = [
    sys.executable,
    "-m",
    "moejax.main",
    "--config",
    config,
    "--workdir",
    str(workdir),
    f"--config.data.data_dir={data_dir}",
    *(TINY if tiny else ()),
    *overrides,
  ]
  return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def start_cli(workdir, *overrides, data_dir, config="configs/quickstart.py"):
  """Starts the CLI in the background (for signal tests); returns the Popen."""
  args = [
    sys.executable,
    "-m",
    "moejax.main",
    "--config",
    config,
    "--workdir",
    str(workdir),
    f"--config.data.data_dir={data_dir}",
    *TINY,
    *overrides,
  ]
  return subprocess.Popen(
    args,
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def without_compilation_cache(env: dict) -> dict:
  """`env` for processes that run at the same time as each other: no persistent compilation cache
  (jax writes its entries without a lock; see conftest.py)."""
  return {k: v for k, v in env.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "MOEJAX_TEST_XLA_CACHES")}
