"""Kernels layer: CPU kernels (C++ through the XLA FFI) and GPU kernels (Pallas).

Each kernel keeps its configuration, kernel, wrapper and plain-jnp reference
side by side, and this package imports nothing else from jqx. Which kernel
runs a product is decided in one place, :mod:`jqx.ops.dispatch`.
``jqx.kernels.pallas`` is imported lazily (it loads Pallas).
"""
