"""Accuracy-preserving post-training quantization: GPTQ, HQQ, AWQ, SmoothQuant, LLM.int8().

Each algorithm is a :class:`jqx.Recipe` subclass (``jqx.gptq``, ``jqx.hqq``,
``jqx.awq``, ``jqx.smoothquant``) whose ``quantize_weight(w, path, stats)``
returns an ordinary :class:`jqx.QArray`; the core functions
(``gptq_quantize``, ``hqq_quantize``, ``awq_quantize``, ``smoothquant_quantize``,
``llm_int8_matmul``) also work directly on a weight and its statistics.
"""
