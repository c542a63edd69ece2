"""Peak resident memory of a stretch of this process (Linux), for the memory experiments.

  start = memory.reset_peak()   # VmHWM := the current resident set; returns it (bytes)
  ...                           # the work to measure
  memory.peak() - start         # the most it held above the start

Linux keeps the peak resident set (VmHWM) per process; writing 5 to /proc/self/clear_refs resets
it to the current one (Linux >= 4.0).
"""

from __future__ import annotations


def status(field: str) -> int:
  """A size field of /proc/self/status (VmRSS, VmHWM, ...), in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
  """Makes the peak the current resident set; returns that (bytes)."""
  start = status("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return start


def peak() -> int:
  """The peak resident set since the last reset (bytes)."""
  return status("VmHWM")
