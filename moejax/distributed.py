"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

One process per host (TPU) or per host / GPU (GPU clusters) runs the same command; process 0
writes the workdir's config, metrics and summary, every process takes part in checkpoints
(orbax coordinates them; the workdir must be on a file system all hosts share).

  distributed.initialize='auto'  initialize when a coordinator address is given
                                 (distributed.coordinator_address or $JAX_COORDINATOR_ADDRESS)
                                 or a multi-process cluster is detected: a Cloud TPU pod slice
                                 (several $TPU_WORKER_HOSTNAMES), SLURM ($SLURM_NTASKS > 1) or
                                 Open MPI ($OMPI_COMM_WORLD_SIZE > 1), whose launchers JAX reads
                                 the rest from. One process otherwise.
                     'yes' / 'no'  always / never.
Explicit address, process count and id (e.g. two processes on one machine):
  --config.distributed.coordinator_address=127.0.0.1:12345 \
  --config.distributed.num_processes=2 --config.distributed.process_id=0   (and =1)
"""

from __future__ import annotations

import os

import ml_collections

from moejax.errors import ConfigError


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "1") or 1)
  except ValueError:
    return 1


def cluster_detected() -> bool:
  """Whether the environment is one process of a multi-process job that JAX can configure itself."""
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return len(hosts) > 1 or _int_env("SLURM_NTASKS") > 1 or _int_env("OMPI_COMM_WORLD_SIZE") > 1


def check(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for distributed.* values that cannot work (also run by config.validate)."""
  d = cfg.distributed
  if d.initialize not in ("auto", "yes", "no"):
    raise ConfigError("distributed.initialize", f"{d.initialize!r} is not allowed; choose one of 'auto', 'yes', 'no'")
  if d.num_processes < 0:
    raise ConfigError("distributed.num_processes", f"must be >= 0 (0: from the cluster), got {d.num_processes}")
  if d.process_id < -1 or (d.num_processes and d.process_id >= d.num_processes):
    raise ConfigError(
      "distributed.process_id",
      f"must be -1 (from the cluster) or in [0, num_processes={d.num_processes}), got {d.process_id}",
    )
  if (d.process_id >= 0) != (d.num_processes > 0):
    raise ConfigError(
      "distributed.process_id" if d.num_processes else "distributed.num_processes",
      "set distributed.num_processes and distributed.process_id together (or neither)",
    )


def initialize(cfg: ml_collections.ConfigDict) -> bool:
  """Calls jax.distributed.initialize when the config asks for it; returns whether it did.

  Must run before anything asks JAX for its devices. Raises ConfigError for values that
  cannot work.
  """
  check(cfg)
  d = cfg.distributed
  address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if d.initialize == "no":
    return False
  if d.initialize == "auto" and not address and not cluster_detected():
    if d.num_processes > 1:
      raise ConfigError(
        "distributed.coordinator_address",
        f"needed with distributed.num_processes={d.num_processes} (host:port of process 0), "
        "unless a cluster launcher provides it",
      )
    return False
  import jax

  try:
    jax.distributed.initialize(
      coordinator_address=address or None,
      num_processes=d.num_processes or None,
      process_id=d.process_id if d.process_id >= 0 else None,
    )
  except (ValueError, RuntimeError) as e:  # JAX's own checks, or no coordinator to reach.
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    raise ConfigError("distributed", f"jax.distributed.initialize failed: {first}") from e
  return True
