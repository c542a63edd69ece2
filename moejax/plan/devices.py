"""Accelerators the memory planner knows: their memory per device, and where each figure comes from.

A GPU's "80 GB" is HBM in stacks of GiB; what the driver reports (`nvidia-smi --query-gpu=
memory.total`) is a little less than the stacks hold, and that is the figure used here. TPU
figures are Google's per-chip HBM (Cloud TPU system architecture pages), in GiB as JAX's
`memory_stats()['bytes_limit']` counts them. No figure here subtracts what the runtime itself
keeps (CUDA context, XLA's reserved memory): the planner's margin (`USABLE_FRACTION`) stands for it.
"""

from __future__ import annotations

import dataclasses

MiB, GiB = 2**20, 2**30
# "Fits" means the estimated per-device peak is at most this share of the device's memory: the
# rest is for the runtime, fragmentation and what no estimate sees (XLA:GPU's default
# XLA_PYTHON_CLIENT_MEM_FRACTION is 0.75 of the free memory; set it to 0.9 or more to use this).
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  memory_bytes: int  # Per device (one GPU, one TPU chip).
  source: str

  @property
  def usable_bytes(self) -> int:
    return int(self.memory_bytes * USABLE_FRACTION)


DEVICES = {
  d.name: d
  for d in (
    Device("a100-40gb", 40_960 * MiB, "A100-SXM4-40GB: nvidia-smi memory.total 40960 MiB"),
    Device("a100-80gb", 81_920 * MiB, "A100-SXM4-80GB: nvidia-smi memory.total 81920 MiB"),
    Device("h100-80gb", 81_559 * MiB, "H100 80GB HBM3 (SXM): nvidia-smi memory.total 81559 MiB"),
    Device("h800", 81_559 * MiB, "H800 80GB (SXM; DeepSeek's GPU): the H100's 80 GB HBM3"),
    Device("h200", 143_771 * MiB, "H200 141 GB HBM3e: nvidia-smi memory.total 143771 MiB"),
    Device("b200", 183_359 * MiB, "B200 (HGX/DGX; DGX B200 guide: 1,440 GB for 8): nvidia-smi 183359 MiB"),
    Device("tpu-v4", 32 * GiB, "Cloud TPU v4: 32 GiB HBM2 per chip"),
    Device("tpu-v5e", 16 * GiB, "Cloud TPU v5e: 16 GiB HBM2 per chip"),
    Device("tpu-v5p", 95 * GiB, "Cloud TPU v5p: 95 GiB HBM2e per chip"),
    Device("tpu-v6e", 32 * GiB, "Cloud TPU v6e (Trillium): 32 GiB HBM per chip"),
  )
}


def platform(device: Device) -> str:
  """'gpu' or 'tpu': what the target's backend would resolve moejax's 'auto' choices for."""
  return "tpu" if device.name.startswith("tpu") else "gpu"
