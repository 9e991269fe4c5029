"""Train the Shakespeare char LM in float32, bfloat16 and float16 (dynamic loss scaling).

    python examples/train_mixed_precision.py              # 150 steps per precision
    python examples/train_mixed_precision.py --steps 50   # a smoke run
    # the same, one process per precision, then one table:
    for p in f32 bf16 fp16; do python examples/train_mixed_precision.py --only $p --json mp_$p.json & done; wait
    python examples/train_mixed_precision.py --report mp_f32.json mp_bf16.json mp_fp16.json

Each run starts from the same initialisation and sees the same batches; only
the policy differs: float32 master weights and float32 output (logits) in all
three, compute in float32 / bfloat16 / float16. The float16 run uses
``jqx.mixed_precision.dynamic_loss_scale`` (start 2**15, x2 after 2000 finite
steps, /2 on overflow, overflowing steps skipped); bfloat16 needs no loss
scaling (its policy's default). The validation loss of each run's final
weights is computed on the held-out plays, both in the run's own compute
dtype and in float32, and compared with the float32 run.
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

from jqx import mixed_precision as mp  # noqa: E402
from jqx_demo import charlm  # noqa: E402
from jqx_demo.shakespeare import batches, load_shakespeare  # noqa: E402

POLICIES = {
    "f32": "params=float32,compute=float32,output=float32",
    "bf16": "params=float32,compute=bfloat16,output=float32",
    "fp16": "params=float32,compute=float16,output=float32",
}


def run(name: str, args, cfg, data) -> dict:
    policy = mp.get_policy(POLICIES[name])
    fwd = policy.apply(charlm.apply_fn(cfg))  # casts params to compute, logits to f32

    def loss_fn(params, batch):
        return charlm.cross_entropy(fwd(params, batch[:, :-1]), batch[:, 1:])

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, args.steps, end_value=args.lr * 0.1
    )
    inner = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.01)
    )
    opt = policy.wrap_optimizer(inner)  # fp16: dynamic loss scaling; bf16/f32: none
    grad_fn = mp.value_and_grad(loss_fn)

    @jax.jit
    def step(params, state, batch):
        loss, grads = grad_fn(state, params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    if args.from_checkpoint:  # continue training the cached float32 model
        ckpt_cfg, params, _ = charlm.load_params()
        if ckpt_cfg != cfg:
            raise ValueError(
                f"--from-checkpoint needs --seq {ckpt_cfg.max_len}; the checkpoint is {ckpt_cfg}."
            )
    else:
        params = charlm.get_params(charlm.CharLM(cfg, rngs=nnx.Rngs(args.seed)))
    state = opt.init(params)
    it = batches(data.train, args.batch, args.seq, seed=args.seed)
    t0 = time.time()
    for i in range(1, args.steps + 1):
        params, state, loss = step(params, state, next(it))
        if i % 100 == 0 or i == args.steps:
            print(
                f"  [{name}] step {i:4d} loss {float(loss):.4f} scale {float(mp.loss_scale(state)):g} "
                f"skipped {int(state.loss_scale.skipped)}  {time.time() - t0:.0f}s",
                flush=True,
            )
    seconds = time.time() - t0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)), "non-finite params"
    val_own, _ = charlm.evaluate(lambda t: fwd(params, t), data.val, seq_len=args.seq)
    val_f32, _ = charlm.evaluate(
        lambda t: charlm.apply_fn(cfg)(params, t), data.val, seq_len=args.seq
    )
    return {
        "policy": str(policy),
        "val_loss": val_own,
        "val_loss_f32_eval": val_f32,
        "skipped_steps": int(state.loss_scale.skipped),
        "final_loss_scale": float(mp.loss_scale(state)),
        "train_seconds": round(seconds, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=sorted(POLICIES), nargs="*", default=list(POLICIES))
    ap.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="start every run from the cached float32 checkpoint instead of a fresh init",
    )
    ap.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    ap.add_argument(
        "--report",
        type=pathlib.Path,
        nargs="+",
        default=None,
        help="print the table from --json files of earlier runs (e.g. one process per precision)",
    )
    args = ap.parse_args(argv)

    results = {}
    if args.report:
        for path in args.report:
            saved = json.loads(path.read_text())
            results.update(saved["results"])
            for k in ("steps", "batch", "seq", "seed", "lr", "from_checkpoint"):
                setattr(args, k, saved["args"].get(k, getattr(args, k)))
        results = {k: results[k] for k in POLICIES if k in results}
    else:
        cfg = charlm.CharLMConfig(max_len=args.seq)
        data = load_shakespeare()
        for name in args.only:
            print(f"{name}: {POLICIES[name]}", flush=True)
            results[name] = run(name, args, cfg, data)

    ref = results.get("f32", {}).get("val_loss")
    start = "the cached checkpoint" if args.from_checkpoint else f"a fresh init (seed {args.seed})"
    print(
        f"\n{args.steps} steps x batch {args.batch} x seq {args.seq}, lr {args.lr}, from {start}\n"
    )
    print(
        "| run | val loss (nats/char, own dtype) | vs f32 | val loss, f32 eval | skipped steps | final loss scale | train s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rel = f"{100 * (r['val_loss'] / ref - 1):+.2f}%" if ref else "n/a"
        print(
            f"| {name} | {r['val_loss']:.4f} | {rel} | {r['val_loss_f32_eval']:.4f} | {r['skipped_steps']} | "
            f"{r['final_loss_scale']:g} | {r['train_seconds']:.0f} |"
        )
    if args.json:
        saved_args = {
            k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
        }
        args.json.write_text(json.dumps({"args": saved_args, "results": results}, indent=1))


if __name__ == "__main__":
    main()
