"""The demo and the model ports used to show and evaluate jqx (not library API).

``python -m jqx demo`` imports :mod:`jqx_demo.demo` lazily. The ports
(:mod:`jqx_demo.minilm`, a Flax all-MiniLM-L6-v2; :mod:`jqx_demo.charlm`, a
small character LM with its checkpoint) and :mod:`jqx_demo.shakespeare` (the
text reader) serve the demo, the benchmarks and the tests. Their data ship in
``jqx_demo/data``.
"""
