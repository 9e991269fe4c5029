"""CPU kernels, built on first use and called through the XLA FFI
(:mod:`jqx.kernels.cpu.native`): an AVX512-VNNI int8 GEMM and a 4-bit weight-only
decode kernel (``int8_gemm.cc``), and AVX2 kernels for GGUF's Q4_0 / Q4_1 / Q8_0
blocks at decode sizes on a persistent thread pool (``gguf_gemv.cc``). Each source
is its own library with its own availability check."""
