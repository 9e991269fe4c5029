"""Train the Shakespeare character LM and cache its checkpoint.

    python examples/train_charlm.py                 # defaults: the cached checkpoint's run
    python examples/train_charlm.py --steps 200 --out /tmp/lm.safetensors   # a quick one

AdamW with linear warm-up and cosine decay, jit-compiled steps, random
windows of the training plays; the held-out plays are scored at the end with
``jqx_demo.charlm.evaluate`` (the same windows every evaluation uses) and the
numbers are stored in the checkpoint's metadata.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jqx_demo import charlm  # noqa: E402
from jqx_demo.shakespeare import batches, eval_windows, load_shakespeare  # noqa: E402


def make_optimizer(
    lr: float, steps: int, warmup: int, weight_decay: float
) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.1)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=weight_decay),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--out", type=pathlib.Path, default=charlm.DEFAULT_CHECKPOINT)
    args = ap.parse_args(argv)

    cfg = charlm.CharLMConfig(max_len=args.seq)
    data = load_shakespeare()
    params = charlm.get_params(charlm.CharLM(cfg, rngs=nnx.Rngs(args.seed)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"CharLM {cfg}: {n_params:,} parameters; train {len(data.train):,} chars, val {len(data.val):,}"
    )

    opt = make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(charlm.loss_fn)(params, batch, cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    quick_val = eval_windows(data.val, args.seq, 32)
    val_loss = jax.jit(lambda p, w: charlm.loss_fn(p, w, cfg))
    it = batches(data.train, args.batch, args.seq, seed=args.seed)
    t0 = time.time()
    running = None
    for i in range(1, args.steps + 1):
        params, opt_state, loss = step(params, opt_state, next(it))
        loss = float(loss)
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if i % args.eval_every == 0 or i == args.steps:
            v = float(val_loss(params, quick_val))
            print(
                f"step {i:5d}  train {running:.3f} nats  val(quick) {v:.3f} nats = "
                f"{charlm.bits_per_char(v):.3f} bits/char  {time.time() - t0:6.0f}s",
                flush=True,
            )
    train_s = time.time() - t0

    f = charlm.apply_fn(cfg)
    loss, bpc = charlm.evaluate(lambda t: f(params, t), data.val, seq_len=args.seq)
    print(
        f"final validation: {loss:.4f} nats/char = {bpc:.4f} bits/char (bigram model: 3.67 bits/char)"
    )
    charlm.save_checkpoint(
        params,
        args.out,
        config=cfg,
        val_loss_nats=loss,
        val_bits_per_char=bpc,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        lr=args.lr,
        seed=args.seed,
        train_seconds=round(train_s, 1),
        command="python examples/train_charlm.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    )
    size = args.out.stat().st_size
    print(f"saved {args.out.name} ({size / 1e6:.1f} MB) after {train_s:.0f}s of training")


if __name__ == "__main__":
    main()
