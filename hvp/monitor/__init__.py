"""Curvature monitoring for training loops: sharpness, trace and spectra every few steps.

See :class:`CurvatureMonitor` and ``docs/monitor.md``.
"""

from hvp.monitor._monitor import (
    CurvatureMonitor,
    MonitorError,
    MonitorRecord,
    MonitorSummary,
    MonitorWarning,
    extract_params,
    read_history,
)
from hvp.monitor._plot import plot_history

__all__ = [
    "CurvatureMonitor",
    "MonitorError",
    "MonitorRecord",
    "MonitorSummary",
    "MonitorWarning",
    "extract_params",
    "plot_history",
    "read_history",
]
