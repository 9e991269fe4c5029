"""Calibration layer: statistics passes through the interpreter (``jqx.calibrate``).

:mod:`jqx.calibration.engine` runs the passes and applies the recipes;
:mod:`jqx.calibration.stats` accumulates per-weight input statistics.
"""
