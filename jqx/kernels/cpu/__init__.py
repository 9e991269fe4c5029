"""CPU kernels: an AVX512-VNNI int8 GEMM and a 4-bit weight-only decode kernel
(:mod:`jqx.kernels.cpu.native`), built on first use and called through the XLA FFI."""
