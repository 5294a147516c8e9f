"""What machine a benchmark ran on: every benchmark prints it beside its ratios.

Ratios move with the CPU (how fast its backward pass is against its forward pass, say), so a
figure without the CPU that produced it cannot be compared with another.
"""

from __future__ import annotations

import os
import platform

__all__ = ["cpu_model", "machine_line"]


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """``CPU: <model> (<n> cores)``, the first line every benchmark prints."""
    return f"CPU: {cpu_model()} ({os.cpu_count()} cores)"
