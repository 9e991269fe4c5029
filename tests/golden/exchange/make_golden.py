"""Writes the exchange-format golden checkpoints beside this script (run once; needs torch
and compressed-tensors, which are not test dependencies).

Each case is a directory ``<case>/`` with ``config.json`` and ``model.safetensors`` as the
reference tools write them, plus ``expected.npz`` (``weight``: the reference
dequantization of layer ``model.layers.0.mlp.up_proj``, float32, ``(out, in)``).

Reference packers:

- GPTQ: the ``pack`` method of AutoGPTQ's ``QuantLinear``
  (AutoGPTQ/AutoGPTQ, auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py at commit
  179776bd1d97a2e7f84b72318630f43719647a11), transcribed below with the ``g_idx[idx]``
  lookup of its sibling qlinear_cuda.py (desc_act); its dequantization
  ``scales * (weight - (zeros + 1))`` in the same file's forward. v2 files store the
  zero points without the ``- 1`` (GPTQModel's ``checkpoint_format="gptq_v2"``).
- AWQ: ``WQLinear_GEMM.from_linear`` (casper-hansen/AutoAWQ, awq/modules/linear/gemm.py
  at commit 030fe2a15b959425d278de8121f03ed895e3b10c), transcribed below.
- compressed-tensors: the installed package itself (``PackedQuantizationCompressor`` and
  ``NaiveQuantizationCompressor``, ``quantize``/``dequantize``; for
  ``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized`` its ``MXFP4PackedCompressor`` /
  ``NVFP4PackedCompressor`` with the scales of its observers' ``calculate_qparams`` and
  ``generate_gparam``, and the config its ``QuantizationConfig`` writes). The FP4 cases
  also store the input weight (``expected.npz`` key ``w``) and hold rows of zeros,
  negatives that round to -0, float32 subnormals, values at and beyond E2M1's
  saturation (6) and E4M3's (448). After writing them the script exports jqx's own
  quantization of the same weights with ``jqx.io.exchange.save`` and checks that the
  compressed-tensors decompressor reads the files back to jqx's values bit for bit.

Usage (compressed-tensors 0.20.1, a CPU torch; ``fp4``: only the MXFP4 / NVFP4 cases):
python tests/golden/exchange/make_golden.py [fp4]
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
MOD = "model.layers.0.mlp.up_proj"
OUT, IN = 32, 64


def _weight(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, IN, generator=g) * 0.05


# --------------------------------------------------------------------------- GPTQ (AutoGPTQ)


def gptq_pack(W, scales, zeros, g_idx, bits, v2=False):
    """AutoGPTQ QuantLinear.pack, transcribed (W: (out, in); scales/zeros: (out, groups))."""
    scales = scales.t().contiguous()
    zeros = zeros.t().contiguous()
    scale_zeros = zeros * scales
    half_scales = scales.clone().half()
    intweight = []
    for idx in range(IN):
        gi = g_idx[idx]
        intweight.append(
            torch.round((W[:, idx] + scale_zeros[gi]) / half_scales[gi]).to(torch.int)[:, None]
        )
    intweight = torch.cat(intweight, dim=1).t().contiguous().numpy().astype(np.uint32)
    i = 0
    row = 0
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    while row < qweight.shape[0]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    qweight = qweight.astype(np.int32)
    if not v2:
        zeros = zeros - 1
    zeros = zeros.numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = 0
    col = 0
    while col < qzeros.shape[1]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
            i += 32 // bits
            col += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i))
            i += 10
            qzeros[:, col] |= zeros[:, i] << 30
            col += 1
            qzeros[:, col] |= (zeros[:, i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i) + 1)
            i += 10
            qzeros[:, col] |= zeros[:, i] << 31
            col += 1
            qzeros[:, col] |= (zeros[:, i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i) + 2)
            i += 10
            col += 1
    return (
        torch.from_numpy(qweight),
        torch.from_numpy(qzeros.astype(np.int32)),
        half_scales,
        intweight,
    )


def gptq_case(name, bits, sym, desc_act, v2=False, group=32, seed=0):
    W = _weight(seed)
    groups = IN // group
    if desc_act:
        perm = torch.randperm(IN, generator=torch.Generator().manual_seed(seed + 1))
        g_idx = torch.argsort(perm) // group  # consecutive columns of the act order
    else:
        g_idx = torch.arange(IN) // group
    maxq = 2**bits - 1
    scales = torch.zeros(OUT, groups)
    zeros = torch.zeros(OUT, groups)
    for gi in range(groups):
        cols = W[:, g_idx == gi]
        mn, mx = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            amax = torch.maximum(mn.abs(), mx)
            mn, mx = -amax, amax
        s = (mx - mn) / maxq
        scales[:, gi] = s
        zeros[:, gi] = torch.full_like(s, (maxq + 1) / 2) if sym else torch.round(-mn / s)
    scales = scales.half().float()
    zeros = zeros.clamp(1 if not v2 else 0, maxq)
    # GPTQ hands pack() the layer with its weights already replaced by Q (in the
    # quantizer's range), as gptq.py's fasterquant does.
    s_el, z_el = scales[:, g_idx], zeros[:, g_idx]
    W = (torch.clamp(torch.round(W / s_el) + z_el, 0, maxq) - z_el) * s_el
    qweight, qzeros, half_scales, intweight = gptq_pack(W, scales, zeros, g_idx, bits, v2)
    # the reference forward: scales * (weight - zeros) with the zeros as the file means them
    iw = torch.from_numpy(intweight.astype(np.int64)).t()  # (out, in); >maxq would be garbage
    assert int(iw.max()) <= maxq and int(iw.min()) >= 0
    exp = (iw.float() - zeros[:, g_idx]) * half_scales.t().float()[:, g_idx]
    tensors = {
        f"{MOD}.qweight": qweight,
        f"{MOD}.qzeros": qzeros,
        f"{MOD}.scales": half_scales,
        f"{MOD}.g_idx": g_idx.to(torch.int32),
        "model.norm.weight": torch.ones(OUT),
    }
    qc = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }
    write(name, qc, tensors, exp)


# --------------------------------------------------------------------------- AWQ (AutoAWQ)


def awq_case(name, group=32, seed=10):
    W = _weight(seed)
    groups = IN // group
    Wg = W.reshape(OUT, groups, group)
    mx, mn = Wg.amax(2), Wg.amin(2)
    scales = ((mx - mn).clamp(min=1e-5) / 15).half().float()
    zeros = torch.clamp(-torch.round(mn / scales), 0, 15)
    # from_linear(linear, w_bit, group_size, scales=scales.t(), zeros=zeros.t())
    scales_t, zeros_t = scales.t().contiguous(), zeros.t().contiguous()
    scale_zeros = zeros_t * scales_t
    half = scales_t.clone().half()
    intweight = []
    for idx in range(IN):
        intweight.append(
            torch.round((W[:, idx] + scale_zeros[idx // group]) / half[idx // group]).to(torch.int)[
                :, None
            ]
        )
    intweight = torch.cat(intweight, dim=1).clamp(0, 15)  # AutoAWQ quantizes with clamping first
    iw_t = intweight.t().contiguous().to(torch.int32)
    pack_num = 8
    qweight = torch.zeros((iw_t.shape[0], iw_t.shape[1] // 32 * 4), dtype=torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(iw_t.shape[1] // pack_num):
        for i in range(pack_num):
            qweight[:, col] |= iw_t[:, col * pack_num + order_map[i]] << (i * 4)
    zi = zeros_t.to(torch.int32)
    qzeros = torch.zeros((zi.shape[0], zi.shape[1] // 32 * 4), dtype=torch.int32)
    for col in range(zi.shape[1] // pack_num):
        for i in range(pack_num):
            qzeros[:, col] |= zi[:, col * pack_num + order_map[i]] << (i * 4)
    gcol = torch.arange(IN) // group
    exp = (intweight.float() - zeros[:, gcol]) * half.t().float()[:, gcol]
    tensors = {
        f"{MOD}.qweight": qweight,
        f"{MOD}.qzeros": qzeros,
        f"{MOD}.scales": half,
        "model.norm.weight": torch.ones(OUT),
    }
    qc = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "version": "gemm",
        "zero_point": True,
    }
    write(name, qc, tensors, exp)


# --------------------------------------------------------------------------- compressed-tensors


def ct_case(name, fmt, args, seed=20, g_idx=False, act=None, ignore=()):
    W = _weight(seed).to(torch.bfloat16).float()
    a = QuantizationArgs(**args)
    qmax = {"int": 2 ** (a.num_bits - 1) - 1, "float": 448.0}[a.type]
    if a.strategy == "group":
        sh = (OUT, IN // a.group_size)
    elif a.strategy == "channel":
        sh = (OUT, 1)
    elif a.strategy == "block":
        sh = (OUT // a.block_structure[0], IN // a.block_structure[1])
    else:
        sh = (1,)
    Wb = (
        W.reshape(sh[0], OUT // sh[0], sh[-1], IN // sh[-1])
        if len(sh) == 2
        else W.reshape(1, OUT, 1, IN)
    )
    mx, mn = Wb.amax((1, 3)), Wb.amin((1, 3))
    if a.symmetric:
        scale = (torch.maximum(mx.abs(), mn.abs()) / qmax).reshape(sh)
        zp = None
    else:
        scale = ((mx - mn) / (2**a.num_bits - 1)).reshape(sh)
        zp = torch.clamp(
            torch.round(-(2 ** (a.num_bits - 1)) - mn.reshape(sh) / scale),
            -(2 ** (a.num_bits - 1)),
            qmax,
        ).to(torch.int8)
    scale = scale.to(torch.bfloat16)
    sd = {"weight": W.to(torch.bfloat16), "weight_scale": scale}
    if zp is not None:
        sd["weight_zero_point"] = zp
    gidx = None
    if g_idx:
        perm = torch.randperm(IN, generator=torch.Generator().manual_seed(seed + 1))
        gidx = (torch.argsort(perm) // a.group_size).to(torch.int32)
        sd["weight_g_idx"] = gidx
    ia = None
    if act is not None:
        ia = QuantizationArgs(**act)
        if not ia.dynamic:
            sd["input_scale"] = torch.tensor([0.02], dtype=torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=a, input_activations=ia)
    comp = PackedQuantizationCompressor if fmt == "pack-quantized" else NaiveQuantizationCompressor
    out = comp.compress(sd, scheme)
    # the reference dequantization of the stored codes
    dec = comp.decompress(dict(out), scheme)
    exp = (
        dec["weight"].float()
        if "weight" in dec
        else dequantize(out["weight"], scale, zp, a, g_idx=gidx).float()
    )
    tensors = {f"{MOD}.{k}": v for k, v in out.items()}
    tensors["model.norm.weight"] = torch.ones(OUT)
    tensors["lm_head.weight"] = torch.ones(8, OUT)
    qc = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": args, "input_activations": act}
        },
        "ignore": ["lm_head", *ignore],
    }
    write(name, qc, tensors, exp)


# --------------------------------------------------------------------------- MXFP4 / NVFP4

FP4 = {
    "mxfp4-pack-quantized": ("MXFP4A16", MXFP4PackedCompressor, 32),
    "nvfp4-pack-quantized": ("NVFP4A16", NVFP4PackedCompressor, 16),
}


def fp4_weight(seed, big=True):
    """(32, 64) float32: typical weights plus the rows the tests name."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((OUT, IN)) * 0.05).astype(np.float32)
    w[0] = 0.0  # blocks of zeros
    w[1] = -rng.random(IN).astype(np.float32) * 1e-3  # negatives that round to -0
    w[1, ::16] = -3.0
    w[1, 1] = -0.0
    w[2] = rng.standard_normal(IN).astype(np.float32) * 1e-39  # float32 subnormals
    w[2, ::16] = 1e-38
    w[3] = np.tile(np.array([6.0, -6.0, 7.9, 5.0, 4.0, 0.25, 0.75, 1.25], np.float32), IN // 8)
    w[4] = np.tile(np.array([1.75, -1.8, 0.5, 3.5, 2.5, -2.5, 448.0, 500.0], np.float32), IN // 8)
    w[5] = np.linspace(-7.5, 7.5, IN, dtype=np.float32)  # amax mantissa 1.875: rounds up
    w[6] = rng.standard_normal(IN).astype(np.float32) * 1e-20
    w[7, :] = 3.0  # constant blocks
    if big:  # the per-tensor scale of NVFP4 then leaves most rows at E4M3's bottom
        w[8] = rng.standard_normal(IN).astype(np.float32) * 1e4
    return w


def ct_fp4_case(name, fmt, seed=30, big=True):
    preset, comp, g = FP4[fmt]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    w = fp4_weight(seed, big)
    t = torch.from_numpy(w)
    tg = t.reshape(OUT, -1, g)
    sd = {"weight": t}
    if fmt.startswith("nvfp4"):
        gs = generate_gparam(t.min(), t.max())
        sd["weight_global_scale"] = gs
    else:
        gs = None
    scale, zp = calculate_qparams(tg.amin(-1), tg.amax(-1), scheme.weights, global_scale=gs)
    sd.update(weight_scale=scale, weight_zero_point=zp)
    out = comp.compress(sd, scheme)
    exp = comp.decompress(dict(out), scheme)["weight"]
    assert exp.dtype == torch.bfloat16
    tensors = {f"{MOD}.{k}": v for k, v in out.items()}
    tensors["model.norm.weight"] = torch.ones(OUT)
    tensors["lm_head.weight"] = torch.ones(8, OUT)
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        ignore=["lm_head"],
        quantization_status="compressed",
    ).model_dump(mode="json")
    write(name, qc, tensors, exp.float(), w=w)


def check_jqx_export(name, fmt):
    """jqx quantizes the case's weight, jqx.io.exchange.save writes it, and the
    compressed-tensors decompressor must read the file back to jqx's values."""
    import jax.numpy as jnp  # noqa: PLC0415

    import jqx.io.exchange as ex  # noqa: PLC0415
    from jqx.core import mx  # noqa: PLC0415

    preset, comp, _ = FP4[fmt]
    w = np.load(os.path.join(HERE, name, "expected.npz"))["w"]
    q = (
        mx.quantize_mx(w.astype(np.float32), "fp4_e2m1", scale_mode="ct")
        if fmt.startswith("mxfp4")
        else mx.quantize_nvfp4(w)
    )
    q = q.replace(dtype=jnp.bfloat16)
    tmp = tempfile.mkdtemp()
    try:
        ex.save({f"{MOD}.weight": q}, tmp, "compressed-tensors")
        with open(os.path.join(tmp, "config.json")) as fh:
            qc = QuantizationConfig.model_validate(json.load(fh)["quantization_config"])
        assert qc.format == fmt, qc.format
        scheme = qc.config_groups["group_0"]
        t = load_file(os.path.join(tmp, "model.safetensors"))  # safetensors' own reader
        sd = {k[len(MOD) + 1 :]: v for k, v in t.items()}
        got = comp.decompress(sd, scheme)["weight"].float().numpy()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    want = np.asarray(q.dequantize(jnp.bfloat16).astype(jnp.float32))
    # XLA:CPU flushes float32 subnormals (jqx/core/mx.py): compare where jqx's result is
    # not a flushed one.
    flushed = (want == 0) & (np.abs(got) < np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(np.where(flushed, 0, got), want)
    print(name, "jqx export read back by compressed-tensors: equal")


def write(name, qc, tensors, exp, **extra):
    d = os.path.join(HERE, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump({"architectures": ["LlamaForCausalLM"], "quantization_config": qc}, fh, indent=1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "model.safetensors"))
    np.savez_compressed(
        os.path.join(d, "expected.npz"), weight=exp.numpy().astype(np.float32), **extra
    )
    print(name)


def make_all():
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            gptq_case(f"gptq_b{bits}_{'sym' if sym else 'asym'}", bits, sym, False, seed=bits)
    gptq_case("gptq_b4_asym_desc_act", 4, False, True, seed=5)
    gptq_case("gptq_b3_sym_desc_act", 3, True, True, seed=6)
    gptq_case("gptq_b4_asym_v2", 4, False, False, v2=True, seed=7)
    gptq_case("gptq_b8_sym_desc_act_v2", 8, True, True, v2=True, seed=8)
    gptq_case("gptq_b4_sym_channel", 4, True, False, group=IN, seed=9)
    awq_case("awq_gemm_b4")
    ct_case(
        "ct_pack_b4_sym_group",
        "pack-quantized",
        dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
    )
    ct_case(
        "ct_pack_b4_asym_group",
        "pack-quantized",
        dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
    )
    ct_case(
        "ct_pack_b8_sym_channel",
        "pack-quantized",
        dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
    )
    ct_case(
        "ct_pack_b3_asym_channel",
        "pack-quantized",
        dict(num_bits=3, type="int", symmetric=False, strategy="channel"),
    )
    ct_case(
        "ct_int8_channel_static",
        "int-quantized",
        dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
        act=dict(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False),
    )
    ct_case(
        "ct_fp8_block",
        "float-quantized",
        dict(num_bits=8, type="float", symmetric=True, strategy="block", block_structure=[16, 32]),
        act=dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True),
    )
    ct_case(
        "ct_fp8_tensor",
        "float-quantized",
        dict(num_bits=8, type="float", symmetric=True, strategy="tensor"),
    )


def make_fp4():
    ct_fp4_case("ct_mxfp4", "mxfp4-pack-quantized")
    ct_fp4_case("ct_nvfp4", "nvfp4-pack-quantized", big=False)
    ct_fp4_case("ct_nvfp4_range", "nvfp4-pack-quantized", seed=31)
    check_jqx_export("ct_mxfp4", "mxfp4-pack-quantized")
    check_jqx_export("ct_nvfp4", "nvfp4-pack-quantized")
    check_jqx_export("ct_nvfp4_range", "nvfp4-pack-quantized")


if __name__ == "__main__":
    # "fp4": only the MXFP4 / NVFP4 cases (the others keep the files they were made with).
    if sys.argv[1:] != ["fp4"]:
        make_all()
    make_fp4()
