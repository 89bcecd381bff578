"""Peak resident memory of this process, for benchmarks that run each configuration in a child."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_resident_mb() -> float:
    """This process's own peak resident memory. VmHWM starts afresh at exec; ru_maxrss keeps the parent's
    size at fork, so a parent that had trained or loaded models set a floor under every child's reading
    (benchmarks/estimators.py: every toy run read 1160 MB; benchmarks/memory.py: 'after imports' 945 MB)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, the fallback
