"""What every benchmark record says about the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra) -> dict:
    """Platform, CPU model and count, and whatever the benchmark adds (threads, device)."""
    return {"platform": platform.platform(), "cpu": cpu_name(), "cpus": os.cpu_count(), **extra}
