"""Checkpoint load speed: ``jqx.io.checkpoint.load`` of a >= 1 GB int8 checkpoint against
reading the raw file bytes, in the same run.

Writes ``--layers`` int8 per-channel QArrays of ``--dim`` x ``--dim`` (64 x 4096 x 4096
is 1.07 GB of codes) to a temporary directory, then alternates rounds of (a) reading the
whole file with one ``read()`` (and, stricter, ``readinto`` a buffer allocated once)
and (b) ``load`` with every array made ready, with and
without checksum verification. Both read from the page cache after the first round (the
file was just written), so the ratio is the loader's own overhead: header parsing, the
CRC-32 pass and the copy onto the device. Prints the median of each and the ratios.

Usage:
    python benchmarks/checkpoint.py                   # 64 x 4096 x 4096 int8 (1.07 GB)
    python benchmarks/checkpoint.py --layers 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
from _stamp import print_stamp

import jqx
from jqx.io.checkpoint import load, save


def _read_raw(path: str) -> int:
    with open(path, "rb") as f:
        return len(f.read())


def _readinto(path: str, buf) -> int:
    with open(path, "rb", buffering=0) as f:
        return f.readinto(buf)


def _load(path: str, verify: bool) -> int:
    tree = load(path, verify=verify)
    leaves = jax.tree_util.tree_leaves(tree)
    jax.block_until_ready(leaves)
    return len(leaves)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print_stamp()

    # One quantized layer repeated: the bytes on disk are what a real model's would be,
    # without quantizing a gigabyte of floats first.
    w = jax.random.normal(jax.random.key(0), (args.dim, args.dim))
    q = jqx.quantize_array(w, "int8", granularity=jqx.per_channel(-1))
    del w
    tree = {f"layer{i}": {"kernel": q} for i in range(args.layers)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        t = time.perf_counter()
        save(path, tree)
        write_s = time.perf_counter() - t
        size = os.path.getsize(path)
        del tree
        print(
            f"file: {size / 1e9:.3f} GB ({args.layers} x int8 {args.dim}x{args.dim}), "
            f"save {write_s:.2f} s"
        )
        _read_raw(path)  # warm the page cache so every round reads from memory
        # The strictest baseline: into a buffer whose pages already exist (no allocation).
        buf = bytearray(size)
        times: dict[str, list[float]] = {
            "raw read": [],
            "raw readinto": [],
            "load": [],
            "load verify=False": [],
        }
        for _ in range(args.rounds):
            for name, fn in (
                ("raw read", lambda: _read_raw(path)),
                ("raw readinto", lambda: _readinto(path, buf)),
                ("load", lambda: _load(path, True)),
                ("load verify=False", lambda: _load(path, False)),
            ):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        raw = statistics.median(times["raw read"])
        strict = statistics.median(times["raw readinto"])
        print(f"loadavg: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("| what | median s | GB/s | / raw read | / raw readinto |")
        print("|---|---|---|---|---|")
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"| {name} | {m:.3f} | {size / m / 1e9:.2f} | {m / raw:.2f} | {m / strict:.2f} |")


if __name__ == "__main__":
    main()
