"""Curvature monitoring for training loops: sharpness, trace and spectra every few steps.

See :class:`CurvatureMonitor` and ``docs/monitor.md``.
"""

from hvp.monitor._monitor import CurvatureMonitor, MonitorRecord, MonitorSummary, extract_params
from hvp.monitor._plot import plot_history

__all__ = ["CurvatureMonitor", "MonitorRecord", "MonitorSummary", "extract_params", "plot_history"]
