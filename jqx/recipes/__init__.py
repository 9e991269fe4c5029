"""Recipes layer: what a quantized weight looks like, and how it is made.

Round-to-nearest presets (:mod:`jqx.recipes.presets`), the calibrated
algorithms (GPTQ, HQQ, AWQ, SmoothQuant, LLM.int8()), their shared integer
grids (:mod:`jqx.recipes.grid`) and applying recipes to a pytree
(:mod:`jqx.recipes.apply`). Imports only :mod:`jqx.core`.
"""
