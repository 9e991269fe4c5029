"""Quantization-aware fine-tuning of the Shakespeare char LM to int4 (group 32).

    python examples/train_qat.py                 # 150 QAT steps from the cached float checkpoint
    python examples/train_qat.py --lsq           # learned step sizes (LSQ) as well
    python examples/train_qat.py --steps 20      # a smoke run

Three numbers on the same held-out windows (``charlm.evaluate``):

1. the float checkpoint;
2. round-to-nearest PTQ: ``jqx.quantize(params, jqx.int4_weight_only(group_size=32))``;
3. QAT: a short fine-tune of the float weights with ``jqx.qat.fake_quantized``
   (same recipe in the loop, straight-through gradients), then
   ``jqx.qat.convert`` to real QArrays, scored through ``jqx.quantized``.

The goal: QAT recovers at least half of the float-to-PTQ gap, i.e.
``(ptq - qat) / (ptq - float) >= 0.5``. Extra fine-tuning of a checkpoint that
is not fully converged lowers the loss by itself, so ``--control`` also
fine-tunes in float for the same steps and batches and reports the share of
*that* model's float-to-PTQ gap QAT recovers, the fairer number. A JSON line with the numbers is printed
last. Without the cached checkpoint the script trains a float model first
(``--float-steps``), which takes longer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jqx  # noqa: E402
from jqx_demo import charlm  # noqa: E402
from jqx_demo.shakespeare import batches, load_shakespeare  # noqa: E402


def _train(loss, params, opt, data_iter, steps, log_every=50, tag=""):
    state = opt.init(params)

    @jax.jit
    def step(p, s, batch):
        lv, g = jax.value_and_grad(loss)(p, batch)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, lv

    t0 = time.time()
    for i in range(1, steps + 1):
        params, state, lv = step(params, state, next(data_iter))
        if i % log_every == 0 or i == steps:
            print(
                f"  {tag} step {i:4d}  train loss {float(lv):.4f}  {time.time() - t0:5.0f}s",
                flush=True,
            )
    return params


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=150, help="QAT fine-tune steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--lsq", action="store_true", help="learn the scales too (LSQ)")
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None)
    ap.add_argument("--float-steps", type=int, default=600, help="only without a checkpoint")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--control",
        action="store_true",
        help="also fine-tune in float for the same steps and batches, then RTN-quantize: "
        "separates what QAT adds from what more training adds",
    )
    args = ap.parse_args(argv)

    data = load_shakespeare()
    try:
        cfg, params, _ = charlm.load_params(args.checkpoint)
        source = "checkpoint"
    except FileNotFoundError:
        print(f"no float checkpoint: training one for {args.float_steps} steps first", flush=True)
        cfg = charlm.CharLMConfig(max_len=args.seq)
        params = charlm.get_params(charlm.CharLM(cfg, rngs=nnx.Rngs(0)))
        warm = min(50, args.float_steps // 4)
        sched = optax.warmup_cosine_decay_schedule(
            0.0, 3e-3, warm, args.float_steps, end_value=3e-4
        )
        opt = optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=0.01)
        )
        params = _train(
            lambda p, b: charlm.loss_fn(p, b, cfg),
            params,
            opt,
            batches(data.train, args.batch, args.seq, seed=0),
            args.float_steps,
            100,
            "float",
        )
        source = f"trained here ({args.float_steps} steps)"
    apply = charlm.apply_fn(cfg)
    recipe = jqx.int4_weight_only(group_size=args.group_size)

    def ev(fn):
        return charlm.evaluate(fn, data.val, seq_len=args.seq, n_windows=args.eval_windows)[0]

    float_loss = ev(lambda t: apply(params, t))
    qfwd = jqx.quantized(apply)
    ptq = jqx.quantize(params, recipe)
    ptq_loss = ev(lambda t: qfwd(ptq, t))
    print(
        f"float {float_loss:.4f} nats   int4 g{args.group_size} RTN PTQ {ptq_loss:.4f} nats",
        flush=True,
    )

    fq = jqx.qat.fake_quantized(apply, recipe, lsq=args.lsq)
    sched = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    it = batches(data.train, args.batch, args.seq, seed=args.seed)
    t0 = time.time()
    if args.lsq:

        def loss(tr, b):
            return charlm.cross_entropy(fq(tr["scales"], tr["params"], b[:, :-1]), b[:, 1:])

        tr = {"params": params, "scales": jqx.qat.init_scales(params, recipe)}
        tr = _train(loss, tr, opt, it, args.steps, 25, "qat")
        qparams = jqx.qat.convert(tr["params"], recipe, tr["scales"])
    else:

        def loss(p, b):
            return charlm.cross_entropy(fq(p, b[:, :-1]), b[:, 1:])

        qparams = jqx.qat.convert(_train(loss, params, opt, it, args.steps, 25, "qat"), recipe)
    qat_s = time.time() - t0
    qat_loss = ev(lambda t: qfwd(qparams, t))
    control = {}
    if args.control:

        def floss(p, b):
            return charlm.cross_entropy(apply(p, b[:, :-1]), b[:, 1:])

        ft = _train(
            floss,
            params,
            opt,
            batches(data.train, args.batch, args.seq, seed=args.seed),
            args.steps,
            25,
            "float ft",
        )
        control = {
            "control_float_ft_val_nats": round(float(ev(lambda t: apply(ft, t))), 4),
            "control_float_ft_then_ptq_val_nats": round(
                float(ev(lambda t: qfwd(jqx.quantize(ft, recipe), t))), 4
            ),
        }
        print(
            f"control: float fine-tune {control['control_float_ft_val_nats']:.4f} nats, then RTN PTQ "
            f"{control['control_float_ft_then_ptq_val_nats']:.4f} nats",
            flush=True,
        )
        cf, cq = control["control_float_ft_val_nats"], control["control_float_ft_then_ptq_val_nats"]
        control["gap_recovered_vs_control"] = round((cq - float(qat_loss)) / (cq - cf), 3)
        print(
            f"QAT recovers {100 * control['gap_recovered_vs_control']:.0f}% of the gap between the "
            "float fine-tune and its RTN PTQ (same steps and batches)",
            flush=True,
        )
    recovered = (ptq_loss - qat_loss) / (ptq_loss - float_loss)
    print(
        f"QAT{' + LSQ' if args.lsq else ''} ({args.steps} steps, {qat_s:.0f}s): {qat_loss:.4f} nats; "
        f"recovered {100 * recovered:.0f}% of the float-to-PTQ gap (goal: >= 50%)"
    )
    out = {
        "float_source": source,
        "recipe": f"int4_weight_only(group_size={args.group_size})",
        "lsq": args.lsq,
        "qat_steps": args.steps,
        "lr": args.lr,
        "float_val_nats": round(float_loss, 4),
        "ptq_val_nats": round(float(ptq_loss), 4),
        "qat_val_nats": round(float(qat_loss), 4),
        "gap_recovered": round(float(recovered), 3),
        "qat_seconds": round(qat_s, 1),
        **control,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
