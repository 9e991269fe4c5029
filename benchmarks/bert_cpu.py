"""BERT on CPU the ordinary way: jqx against PyTorch, ONNX Runtime and qwix, in one run (issue #17).

    python benchmarks/bert_cpu.py                  # all-MiniLM-L6-v2, batch 32 x 128
    python benchmarks/bert_cpu.py --batch 1        # latency
    python benchmarks/bert_cpu.py --batch 256      # throughput
    python benchmarks/bert_cpu.py --tiny           # the shipped tiny encoder, quick
    python benchmarks/bert_cpu.py --padded         # real sentences padded to 128
    python benchmarks/bert_cpu.py --batch 256 --chunk 32   # JAX rows 32 rows at a time

The same all-MiniLM-L6-v2 weights run as

- PyTorch: a ``transformers`` ``BertModel`` (its default attention) in float32 and
  after ``torch.ao.quantization.quantize_dynamic`` (int8 ``nn.Linear``);
- ONNX Runtime: that torch model exported by ``torch.onnx.export``, in float32
  and after ``onnxruntime.quantization.quantize_dynamic(per_channel=True)``;
- jqx and qwix on three Flax ports written the ordinary way
  (:mod:`jqx_demo.bert`): ``plain`` (einsum -> softmax -> einsum), ``linen``
  (``nn.MultiHeadDotProductAttention``) and ``sdpa`` (``plain``'s layers with
  ``jax.nn.dot_product_attention``), and, with ``--ports plain,linen,sdpa,tuned``,
  on jqx's own tuned port (:mod:`jqx_demo.minilm`).
  jqx: float32 (``jax.jit(apply)``, and the same float32 parameters through
  ``jax.jit(jqx.quantized(apply))``), W8A8 int8 dynamic, int8 weight-only (as
  ``jqx.quantize`` makes them: packed once for the native int8 GEMM where it runs), and,
  where it runs, both again with ``prepack=False`` (the plain layout, packed on every
  call); qwix (``PtqProvider``): W8A8 int8 dynamic, int8 weight-only.

Torch and ONNX Runtime get ``--threads`` threads (default 2); XLA runs as it is
(it uses every core). Timed calls are interleaved across every engine, round
by round, so machine load hits all of them alike; best and median of
``--repeats`` are printed. Before its timed call each engine makes ``--warm-calls``
untimed ones (default 1 at batch <= 8, else 0): a call of a few milliseconds right
after another engine's also pays for that engine's threads, which keep spinning for a
while after their work (ORT's pool, PyTorch's OpenMP, XLA's and jqx's pools); a user
runs one engine in a loop. ``cos`` is the mean cosine of the sentence
embeddings on the shipped sentences to the float32 reference (jqx's tuned
port). ``minflt/call`` is the process's minor page faults per timed call
(``resource.getrusage``), a check for page-fault churn at steady state.
Each goal of the issue is printed as PASS or MISS with its ratio.

The timed batch is random token ids, every token valid. ``--padded`` times the
shipped sentences instead (cycled to the batch), each padded to ``--seq-len`` with
its padding masked: the fixed shape a JAX program keeps to avoid recompiling, given
to every engine. jqx's attention kernel skips each sequence's padded keys; the peers
compute them (a PyTorch user would rather pad to the batch's longest sentence).

The peers are benchmark-only extras (``pip install "jqx[bench]"``); a missing
one is skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# jqx before jax: JQX_REUSE_HOST_MEMORY=1 must act before jax loads (docs/guide/run.md).
import jqx  # noqa: E402, I001  # isort: skip

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _stamp import print_stamp  # noqa: E402

from jqx_demo import bert, minilm  # noqa: E402

PT_FP32, PT_INT8 = "PyTorch fp32", "PyTorch dynamic int8"
ORT_FP32, ORT_INT8 = "ORT fp32", "ORT int8 per-channel"
J_F32, J_W8A8, J_W8 = "jqx float32", "jqx W8A8 dynamic", "jqx int8 weight-only"
# jqx.quantize packs the int8 weights for the native GEMM where it runs (prepack=None);
# these rows (present only there) keep the plain layout, which the GEMM packs per call.
J_W8A8_PLAIN, J_W8_PLAIN = "jqx W8A8 plain layout", "jqx int8 w-o plain layout"
# The float32 parameters through jqx.quantized: no weight is quantized, but the
# interpreter still runs the model its way (e.g. softmax-then-matmul attention in the
# faster order, docs/internals/dispatch.md).
J_F32Q = "jqx f32 via quantized()"
Q_W8A8, Q_W8 = "qwix W8A8 dynamic", "qwix int8 weight-only"

# A runner takes numpy (ids, mask) and returns the embeddings, computation finished.
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _cos(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.sum(a * ref, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)


def _progress(msg: str) -> None:
    # To stderr, so the table on stdout stays clean to paste.
    print(msg, file=sys.stderr, flush=True)


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---------------------------------------------------------------- engines


def jit_apply(apply, chunk: int | None = None):
    """``jax.jit(apply)`` for ``apply(variables, ids, mask)``; with ``chunk``, the batch runs
    ``chunk`` rows at a time inside the one jitted program (``jax.lax.map`` over the whole
    chunks, then the remaining rows), so XLA's temporaries are those of ``chunk`` rows."""
    if chunk is None:
        return jax.jit(apply)

    def by_chunks(variables, ids, mask):
        b = ids.shape[0]
        whole = b - b % chunk
        parts = []
        if whole:
            n = whole // chunk
            stacked = (ids[:whole].reshape(n, chunk, -1), mask[:whole].reshape(n, chunk, -1))
            out = jax.lax.map(lambda a: apply(variables, *a), stacked)
            parts.append(out.reshape(whole, *out.shape[2:]))
        if whole < b:
            parts.append(apply(variables, ids[whole:], mask[whole:]))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    return jax.jit(by_chunks)


def jax_runner(fwd, variables) -> Runner:
    def run(ids, mask):
        return np.asarray(jax.block_until_ready(fwd(variables, ids, mask)))

    return run


def jqx_variants(enc: minilm.Encoder, port: str, chunk: int | None = None) -> dict[str, Runner]:
    """jqx float32 (plain jit, and through jqx.quantized), W8A8 dynamic and int8
    weight-only on one port (``chunk``: see :func:`jit_apply`)."""
    p = enc if port == "tuned" else bert.load_port(port, enc)
    fwd = jit_apply(p.module.apply, chunk)
    fwd_q = jit_apply(jqx.quantized(p.module.apply), chunk)
    w8a8 = jqx.quantize(p.variables, jqx.int8_dynamic_activation_int8_weight())
    w8 = jqx.quantize(p.variables, jqx.int8_weight_only())
    out = {
        J_F32: jax_runner(fwd, p.variables),
        J_F32Q: jax_runner(fwd_q, p.variables),
        J_W8A8: jax_runner(fwd_q, w8a8),
        J_W8: jax_runner(fwd_q, w8),
    }
    if jqx.ops.native_status() == "available":
        w8a8_plain = jqx.quantize(
            p.variables, jqx.int8_dynamic_activation_int8_weight(), prepack=False
        )
        out[J_W8A8_PLAIN] = jax_runner(fwd_q, w8a8_plain)
        out[J_W8_PLAIN] = jax_runner(
            fwd_q, jqx.quantize(p.variables, jqx.int8_weight_only(), prepack=False)
        )
    return out


def qwix_variants(enc: minilm.Encoder, port: str, chunk: int | None = None) -> dict[str, Runner]:
    """qwix W8A8 and int8 weight-only (``PtqProvider``), as benchmarks/minilm.py drives it
    (``chunk``: see :func:`jit_apply`)."""
    import qwix

    p = enc if port == "tuned" else bert.load_port(port, enc)
    ids = jnp.ones((2, 8), jnp.int32)
    rules = {
        Q_W8A8: qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8),
        Q_W8: qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8),
    }
    out = {}
    for name, rule in rules.items():
        qm = qwix.quantize_model(p.module, qwix.PtqProvider([rule]))
        abstract = jax.eval_shape(qm.init, jax.random.key(0), ids, ids)
        qp = qwix.quantize_params(p.variables["params"], abstract["params"])
        out[name] = jax_runner(jit_apply(qm.apply, chunk), {"params": qp})
    return out


def torch_variants(enc: minilm.Encoder, threads: int) -> dict[str, Runner]:
    """PyTorch float32 and ``quantize_dynamic`` int8 (every ``nn.Linear``)."""
    import torch

    torch.set_num_threads(threads)
    model = bert.torch_bert(enc)
    q8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def runner(m) -> Runner:
        def run(ids, mask):
            with torch.inference_mode():
                return m(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

        return run

    return {PT_FP32: runner(model), PT_INT8: runner(q8)}


def ort_variants(enc: minilm.Encoder, threads: int, workdir: Path) -> dict[str, Runner]:
    """ONNX Runtime float32 and ``quantize_dynamic(per_channel=True)`` int8 of the torch model."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    f32, i8 = workdir / "bert.onnx", workdir / "bert_int8.onnx"
    ids = torch.ones((2, 16), dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter with dynamic axes: this model's export by the
        # dynamo exporter (torch 2.13) does not load in ONNX Runtime 1.32.
        torch.onnx.export(
            bert.torch_bert(enc),
            (ids, ids),
            str(f32),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
        quantize_dynamic(str(f32), str(i8), per_channel=True, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1

    def runner(path) -> Runner:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def run(ids, mask):
            return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]

        return run

    return {ORT_FP32: runner(f32), ORT_INT8: runner(i8)}


# ---------------------------------------------------------------- measuring


def _inputs(name: str, ids: np.ndarray, mask: np.ndarray):
    """Each engine's own input form, made once outside the timed call."""
    if name.startswith(("PyTorch", "ORT")):
        return ids.astype(np.int64), mask.astype(np.int64)
    return jnp.asarray(ids), jnp.asarray(mask)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="use the shipped tiny encoder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--sentences", type=int, default=128, help="sentences for the cosine")
    ap.add_argument("--threads", type=int, default=2, help="torch / ORT threads (default 2)")
    ap.add_argument(
        "--ports",
        default="plain,linen,sdpa",
        help="Flax ports for jqx and qwix: plain, linen, sdpa, tuned (comma-separated)",
    )
    ap.add_argument("--no-qwix", action="store_true", help="skip the qwix rows")
    ap.add_argument(
        "--padded",
        action="store_true",
        help="time the shipped sentences padded to --seq-len (padding masked) instead of "
        "random ids with every token valid",
    )
    ap.add_argument(
        "--warm-calls",
        type=int,
        default=None,
        help="untimed calls of each engine before its timed one in every round "
        "(default 1 at batch <= 8, else 0)",
    )
    ap.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="run the JAX rows (jqx, qwix) this many batch rows at a time inside their "
        "jitted program (jax.lax.map): XLA's temporaries shrink to a chunk's",
    )
    args = ap.parse_args(argv)
    if args.chunk is not None and not 1 <= args.chunk <= args.batch:
        ap.error(f"--chunk={args.chunk}: give a number of rows from 1 to --batch ({args.batch})")
    if args.warm_calls is None:
        args.warm_calls = 1 if args.batch <= 8 else 0
    if args.warm_calls < 0:
        ap.error(f"--warm-calls={args.warm_calls}: give 0 or more untimed calls")
    ports = [p for p in args.ports.split(",") if p]
    bad = [p for p in ports if p not in (*bert.PORTS, "tuned")]
    if bad:
        ap.error(f"--ports={args.ports!r}: unknown {bad}; choose from {(*bert.PORTS, 'tuned')}")
    t_start = time.perf_counter()

    if args.tiny or not minilm.weights_available():
        if not args.tiny:
            print(f"all-MiniLM-L6-v2 is not installed ({minilm.INSTALL_HINT}); using the tiny one")
        enc = minilm.load_tiny()
    else:
        enc = minilm.load_minilm()
    seq = min(args.seq_len, enc.config.max_position)

    # variants: (group, name) -> runner; group is "peer" or the Flax port.
    variants: dict[tuple[str, str], Runner] = {}
    notes = []
    tmp = tempfile.TemporaryDirectory()
    try:
        variants.update({("peer", k): v for k, v in torch_variants(enc, args.threads).items()})
    except ImportError as e:
        notes.append(f"PyTorch rows skipped ({e.name} not installed; pip install 'jqx[bench]')")
    try:
        variants.update(
            {("peer", k): v for k, v in ort_variants(enc, args.threads, Path(tmp.name)).items()}
        )
    except ImportError as e:
        notes.append(
            f"ONNX Runtime rows skipped ({e.name} not installed; pip install 'jqx[bench]')"
        )
    for port in ports:
        variants.update({(port, k): v for k, v in jqx_variants(enc, port, args.chunk).items()})
        if args.no_qwix:
            continue
        try:
            variants.update({(port, k): v for k, v in qwix_variants(enc, port, args.chunk).items()})
        except ImportError:
            notes.append(f"qwix rows on {port} skipped (pip install qwix)")
        except Exception as e:  # a port qwix cannot intercept is a finding, not a crash
            notes.append(f"qwix on {port} failed: {type(e).__name__}: {str(e)[:200]}")

    # Accuracy: fixed (32, seq) batches of real sentences, padding masked.
    sents = minilm.load_sentences(args.sentences)
    eval_b = []
    for i in range(0, len(sents), 32):
        ids, mask = enc.tokenize(sents[i : i + 32], max_len=seq, pad_to=seq)
        eval_b.append((ids, mask))
    ref_fwd = jax.jit(enc.module.apply)
    ref = np.concatenate([np.asarray(ref_fwd(enc.variables, i, m)) for i, m in eval_b])
    cos = {}
    for key, run in variants.items():
        got = np.concatenate([run(*_inputs(key[1], i, m)) for i, m in eval_b])
        cos[key] = float(_cos(got, ref).mean())
        _progress(f"cosine of {key[0]} {key[1]}: {cos[key]:.5f}")

    if args.padded:
        every = minilm.load_sentences(None)
        chosen = [every[i % len(every)] for i in range(args.batch)]
        lat_ids, lat_mask = (np.asarray(a) for a in enc.tokenize(chosen, max_len=seq, pad_to=seq))
        lengths = lat_mask.sum(1)
        timed_on = (
            f"the shipped sentences padded to {seq} (lengths {lengths.min()}-{lengths.max()}, "
            f"median {int(np.median(lengths))})"
        )
    else:
        rng = np.random.default_rng(0)
        lat_ids = rng.integers(1, enc.config.vocab_size, (args.batch, seq)).astype(np.int32)
        lat_mask = np.ones((args.batch, seq), np.int32)
        timed_on = "random ids, every token valid"
    inputs = {key: _inputs(key[1], lat_ids, lat_mask) for key in variants}
    for key, run in variants.items():
        run(*inputs[key])  # compile + warm up
    times: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
    faults = dict.fromkeys(variants, 0)
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for key, run in variants.items():
            for _ in range(args.warm_calls):
                run(*inputs[key])
            f0, t0 = _minflt(), time.perf_counter()
            run(*inputs[key])
            times[key].append(time.perf_counter() - t0)
            faults[key] += _minflt() - f0
        load.append(os.getloadavg()[0])
        _progress(f"round {len(load) - 1}/{args.repeats} done")
    tmp.cleanup()

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    c = enc.config
    print()
    print_stamp()
    # A kernel that did not build leaves jqx's rows on XLA: say so with the tables.
    print(f"jqx native kernels: {jqx.ops.native_status()}")
    print(
        f"{enc.name} ({c.num_layers} layers, hidden {c.hidden_size}); batch {args.batch} x {seq} "
        f"tokens; best / median of {args.repeats} interleaved rounds ({args.warm_calls} "
        "untimed call(s) of each engine before its timed one); torch and ORT "
        f"{args.threads} threads, XLA {jax.default_backend()} as is; {os.cpu_count()} cores; "
        f"1-min load average {min(load):.1f}-{max(load):.1f} during the timed rounds; "
        f"cos on {len(sents)} sentences; timed on {timed_on}"
        + (
            f"; JAX rows run {args.chunk} batch rows at a time (--chunk)"
            if args.chunk is not None
            else ""
        )
    )
    for n in notes:
        print("note:", n)
    head = (
        f"{'port':6s} {'engine / recipe':24s} {'best ms':>8s} {'median ms':>9s} "
        f"{'vs PT fp32':>10s} {'cos':>8s} {'minflt/call':>11s}"
    )
    print(head + "\n" + "-" * len(head))
    pt = best.get(("peer", PT_FP32))
    for key in variants:
        rel = f"{pt / best[key]:9.2f}x" if pt else f"{'-':>10s}"
        print(
            f"{key[0]:6s} {key[1]:24s} {1e3 * best[key]:8.1f} {1e3 * med[key]:9.1f} {rel} "
            f"{cos[key]:8.5f} {faults[key] / args.repeats:11.0f}"
        )

    def goal(desc, ok, value):
        print(f"  {'PASS' if ok else 'MISS'}  {desc}: {value}")
        return ok

    def ms(key):
        return f"{1e3 * best[key]:.0f} ms"

    ok = []
    print("\ngoals (issue #17), on best times:")
    for port in ports:
        j = {k: (port, k) for k in (J_F32, J_W8A8, J_W8, Q_W8A8, Q_W8)}
        sp = best[j[J_F32]] / best[j[J_W8A8]]
        ok.append(goal(f"[{port}] jqx W8A8 >= 2x jqx float32", sp >= 2.0, f"{sp:.2f}x"))
        sq = best[(port, J_F32Q)] / best[j[J_W8A8]]
        ok.append(goal(f"[{port}] jqx W8A8 >= 2x {J_F32Q} (stricter)", sq >= 2.0, f"{sq:.2f}x"))
        if j[Q_W8A8] in best:
            r = best[j[Q_W8A8]] / best[j[J_W8A8]]
            ok.append(
                goal(
                    f"[{port}] jqx W8A8 faster than qwix W8A8",
                    r > 1.0,
                    f"{r:.2f}x ({ms(j[J_W8A8])} vs {ms(j[Q_W8A8])})",
                )
            )
        peers8 = [("peer", k) for k in (PT_INT8, ORT_INT8) if ("peer", k) in best]
        if peers8:
            fast = min(peers8, key=best.get)
            r = best[fast] / best[j[J_W8A8]]
            ok.append(
                goal(
                    f"[{port}] {J_W8A8} at least as fast as the faster int8 peer ({fast[1]})",
                    r >= 1.0,
                    f"{r:.2f}x ({ms(j[J_W8A8])} vs {ms(fast)})",
                )
            )
            top = max(peers8, key=cos.get)
            ok.append(
                goal(
                    f"[{port}] jqx W8A8 more accurate than the int8 peers",
                    cos[j[J_W8A8]] > cos[top],
                    f"cos {cos[j[J_W8A8]]:.5f} vs {top[1]} {cos[top]:.5f}",
                )
            )
        if pt:
            for name in (J_W8, J_F32, J_F32Q):
                if (port, name) not in best:
                    continue
                r = pt / best[(port, name)]
                ok.append(
                    goal(
                        f"[{port}] {name} at least as fast as PyTorch fp32",
                        r >= 1.0,
                        f"{r:.2f}x ({ms((port, name))} vs {ms(('peer', PT_FP32))})",
                    )
                )
    print(f"\n{sum(ok)}/{len(ok)} goals met ({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
