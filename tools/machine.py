"""What this machine offers, for the grid's worker pool and the reports' machine lines."""
from __future__ import annotations

import os
import platform
from typing import List


def usable_cores() -> List[int]:
  """The CPU cores this process may run on (its affinity; ``taskset`` narrows it)."""
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return list(range(os.cpu_count() or 1))


def describe() -> str:
  """'<CPU model>, N cores usable, Linux <release>'."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{cpu}, {len(usable_cores())} cores usable, {platform.system()} {platform.release()}"
