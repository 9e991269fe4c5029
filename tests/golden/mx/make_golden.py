"""Makes the MX / NVFP4 golden files from the compressed-tensors encoders (run once).

    pip install compressed-tensors==0.20.1 torch   # a CPU torch is enough
    python tests/golden/mx/make_golden.py

Writes ``mxfp4.npz``, ``mxfp8.npz``, ``nvfp4.npz`` and ``nvfp4_rows.npz`` beside this script: the input
weight ``w`` (float32, torch layout ``(out, in)``), and what compressed-tensors makes of
it: for ``mxfp4-pack-quantized`` and ``nvfp4-pack-quantized`` the compressor's
``weight_packed`` (uint8, two FP4 codes per byte, low nibble first) and ``weight_scale``
(MXFP4: the E8M0 byte; NVFP4: the FP8 E4M3 byte) and NVFP4's ``weight_global_scale``;
for MXFP8 (``float-quantized``, no packer) the E8M0 byte of ``calculate_qparams``' scale
and the E4M3 bytes of ``quantize``. The rows hold the edge cases the tests name: a block
of zeros, -0.0 and negatives that round to zero, float32 subnormals, values at and
beyond the element format's saturation point, exact ties, and blocks whose scale rounds
up under compressed-tensors' rule. The tests never import torch.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

HERE = os.path.dirname(os.path.abspath(__file__))


def weight(k: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, k)).astype(np.float32)
    w[1] = 0.0  # blocks of zeros
    w[2] = -rng.random(k).astype(np.float32) * 1e-3  # tiny negatives next to a big one
    w[2, ::16] = -3.0
    w[2, 1] = -0.0
    w[3] = rng.standard_normal(k).astype(np.float32) * 1e-39  # float32 subnormals
    w[3, ::16] = 1e-38
    w[4] = np.tile(np.array([6.0, -6.0, 7.9, 5.0, 4.0, 0.25, 0.75, 1.25], np.float32), k // 8)
    w[5] = np.tile(np.array([1.75, -1.8, 0.5, 3.5, 2.5, -2.5, 448.0, 500.0], np.float32), k // 8)
    w[6] = rng.standard_normal(k).astype(np.float32) * 1e4
    w[7] = np.linspace(-7.5, 7.5, k, dtype=np.float32)  # amax mantissa 1.875: rounds up
    w[8] = rng.standard_normal(k).astype(np.float32) * 1e-20
    w[9, :] = 3.0  # constant blocks
    w[10] = rng.standard_normal(k).astype(np.float32) * 2e30
    return w


def groups(w: torch.Tensor, g: int):
    wg = w.reshape(w.shape[0], -1, g)
    return wg.amin(-1), wg.amax(-1)


def mxfp4(w: np.ndarray) -> dict:
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    t = torch.from_numpy(w)
    scale, zp = calculate_qparams(*groups(t, 32), scheme.weights)
    out = MXFP4PackedCompressor.compress(
        {"weight": t, "weight_scale": scale, "weight_zero_point": zp}, scheme
    )
    return dict(
        w=w,
        weight_packed=out["weight_packed"].numpy(),
        weight_scale=out["weight_scale"].numpy().astype(np.uint8),
    )


def mxfp8(w: np.ndarray) -> dict:
    scheme = preset_name_to_scheme("MXFP8A16", ["Linear"])
    t = torch.from_numpy(w)
    scale, zp = calculate_qparams(*groups(t, 32), scheme.weights)
    q = quantize(t, scale, zp, scheme.weights, dtype=torch.float8_e4m3fn)
    bits = (127 + torch.floor(torch.log2(scale))).to(torch.int32).numpy().astype(np.uint8)
    return dict(w=w, weight=q.view(torch.uint8).numpy(), weight_scale=bits)


def nvfp4(w: np.ndarray) -> dict:
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    t = torch.from_numpy(w)
    gs = generate_gparam(t.min(), t.max())
    scale, zp = calculate_qparams(*groups(t, 16), scheme.weights, global_scale=gs)
    out = NVFP4PackedCompressor.compress(
        {"weight": t, "weight_scale": scale, "weight_global_scale": gs, "weight_zero_point": zp},
        scheme,
    )
    return dict(
        w=w,
        weight_packed=out["weight_packed"].numpy(),
        weight_scale=out["weight_scale"].view(torch.uint8).numpy(),
        weight_global_scale=out["weight_global_scale"].numpy().astype(np.float32),
    )


def main() -> None:
    w = weight(64)
    for name, fn in (("mxfp4", mxfp4), ("mxfp8", mxfp8), ("nvfp4", nvfp4)):
        data = fn(w)
        np.savez_compressed(os.path.join(HERE, f"{name}.npz"), **data)
        print(name, {k: (v.shape, v.dtype.name) for k, v in data.items()})
    # NVFP4 again without the 2e30 row, so the per-tensor scale leaves the other rows
    # their E4M3 range (above, they all sit at E4M3's bottom).
    data = nvfp4(w[:10])
    np.savez_compressed(os.path.join(HERE, "nvfp4_rows.npz"), **data)
    print("nvfp4_rows", {k: (v.shape, v.dtype.name) for k, v in data.items()})


if __name__ == "__main__":
    main()
