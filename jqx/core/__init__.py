"""Core layer: number formats, the quantization numerics, QArray, and tree utilities.

Framework-free (jax, numpy, ml_dtypes only). :mod:`jqx.core.numerics` is the
only home of the seed formulas (scale, zero point, encoding, activation
absmax) and of building a :class:`~jqx.core.qarray.QArray` from codes and
scales; every other layer calls it. See ``docs/internals/layout.md``.
"""
