"""Peak resident memory of the current process, measured from a known starting point.

Linux keeps a process's peak RSS (``ru_maxrss``, ``VmHWM``) across fork and exec, so a child
process started by a large parent reports the parent's peak. ``reset_peak_rss`` clears it
(``/proc/self/clear_refs``, Linux >= 4.0) so a probe measures only itself.
"""

from __future__ import annotations

import resource

__all__ = ["peak_rss_mb", "reset_peak_rss"]


def reset_peak_rss() -> None:
    """Sets this process's peak RSS to its current RSS (no-op where Linux does not allow it)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak RSS in MB since start or the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
