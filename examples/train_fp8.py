"""Train the Shakespeare char LM with FP8 matmuls (delayed scaling) vs bfloat16.

    python examples/train_fp8.py                # 200 steps per arm
    python examples/train_fp8.py --steps 20     # a smoke run

Both arms start from the same initialisation, see the same batches and use
the same optimizer; float32 master weights, compute in bfloat16. The FP8 arm
additionally runs every ``kernel`` matmul through ``jqx.fp8.delayed_scaling``:
E4M3 inputs and weights, E5M2 output gradients, per-tensor scales from an
amax history (length 1024, margin 0), emulated on CPU. The goal: the FP8
arm's final validation loss within 2% of the bfloat16 arm's. A JSON line with
the numbers is printed last.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jqx  # noqa: E402
from jqx_demo import charlm  # noqa: E402
from jqx_demo.shakespeare import batches, load_shakespeare  # noqa: E402


def bf16_apply(cfg):
    apply = charlm.apply_fn(cfg)

    def f(params, tokens):
        # float32 master weights, bfloat16 compute, float32 logits
        p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        return apply(p16, tokens).astype(jnp.float32)

    return f


def run(arm: str, args, cfg, data, init_params) -> dict:
    fwd = bf16_apply(cfg)
    sched = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, args.steps, end_value=args.lr * 0.1
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=0.01)
    )
    params, opt_state = init_params, opt.init(init_params)
    if arm == "fp8":
        f8 = jqx.fp8.delayed_scaling(fwd)
        fp8_state = jqx.fp8.init_state(init_params, history_len=args.history)

        def loss(p, s, b):
            return charlm.cross_entropy(f8(s, p, b[:, :-1]), b[:, 1:])

        @jax.jit
        def step(p, o, s, b):
            # the "gradient" w.r.t. the fp8 state is its updated value
            lv, (g, s) = jax.value_and_grad(loss, argnums=(0, 1))(p, s, b)
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o, s, lv

        def evaluate_fn(p, s):
            return lambda t: f8(s, p, t)

    else:
        fp8_state = None

        def loss(p, b):
            return charlm.cross_entropy(fwd(p, b[:, :-1]), b[:, 1:])

        @jax.jit
        def step(p, o, s, b):
            lv, g = jax.value_and_grad(loss)(p, b)
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o, s, lv

        def evaluate_fn(p, s):
            return lambda t: fwd(p, t)

    it = batches(data.train, args.batch, args.seq, seed=args.seed)
    t0 = time.time()
    for i in range(1, args.steps + 1):
        params, opt_state, fp8_state, lv = step(params, opt_state, fp8_state, next(it))
        if i % args.log_every == 0 or i == args.steps:
            print(
                f"  {arm:4s} step {i:4d}  train {float(lv):.4f}  {time.time() - t0:5.0f}s",
                flush=True,
            )
    secs = time.time() - t0
    val, bpc = charlm.evaluate(
        evaluate_fn(params, fp8_state), data.val, seq_len=args.seq, n_windows=args.eval_windows
    )
    print(
        f"{arm}: val {val:.4f} nats ({bpc:.3f} bits/char) after {args.steps} steps, {secs:.0f}s",
        flush=True,
    )
    return {"val_nats": round(float(val), 4), "seconds": round(secs, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--history", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.warmup = min(args.warmup, max(1, args.steps // 4))

    data = load_shakespeare()
    cfg = charlm.CharLMConfig(max_len=args.seq)
    init = charlm.get_params(charlm.CharLM(cfg, rngs=nnx.Rngs(args.seed)))
    res = {arm: run(arm, args, cfg, data, init) for arm in ("bf16", "fp8")}
    rel = res["fp8"]["val_nats"] / res["bf16"]["val_nats"] - 1.0
    print(f"fp8 vs bf16 validation loss: {100 * rel:+.2f}% (goal: within 2%)")
    out = {
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        **res,
        "fp8_vs_bf16": round(rel, 4),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
