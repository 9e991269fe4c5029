"""Recipes layer: what a quantized weight looks like, and how it is made.

The recipe protocol and round to nearest (:mod:`jqx.recipes.base`), the
round-to-nearest presets (:mod:`jqx.recipes.presets`), the calibrated
algorithms (GPTQ, HQQ, AWQ, SmoothQuant, LLM.int8()), their shared integer
grids (:mod:`jqx.recipes.grid`) and applying recipes to a pytree
(:mod:`jqx.recipes.apply`). Each recipe is one frozen keyword-only dataclass.
Imports only :mod:`jqx.core`; inside the package imports point one way:
``base`` and ``grid`` first, the algorithms on them, ``presets`` on ``base``
and ``hqq``, ``apply`` on ``base``.
"""
