"""Benchmark: one Mixtral MoE block (`mgjax.layers.mlp.MoE`), its experts as the dense reference (every
expert on every token, weighted 0 where not routed) vs `jax.lax.ragged_dot` (each token through its top-k
experts only: `LMConfig.moe_impl = "ragged"`), forward and forward + backward, in the same process.

Columns: ms per call (median of --repeats calls after a first, compiling one), tokens/s, and the achieved FLOP/s of the
useful work, 2 x 3 x tokens x k x D x F per forward (x 3 with the backward), so the dense path's wasted
FLOPs count as time, not as work. The shapes are Mixtral-8x7B's with the width divided by --shrink.

  python bench/moe.py                    # D = 4096 / 4, F = 14336 / 4, 8 experts, top-2, 2048 tokens
  python bench/moe.py --shrink 1 --tokens 4096   # the real width (an accelerator)

Results go to bench/results/moe.json (and a table on stdout).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from children import ROOT, device_info, write_results  # bench/, the script's folder, is on sys.path

RESULTS = ROOT / "bench" / "results" / "moe.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shrink", type=int, default=4, help="divide Mixtral-8x7B's hidden and expert widths by this")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (rows x length)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (the median is used)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's mgjax

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mgjax.layers.mlp import MoE

    d, f, e, k = 4096 // args.shrink, 14336 // args.shrink, 8, 2
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, d), dtype)
    params = nn.meta.unbox(jax.jit(MoE(e, k, f, "silu", "dense", dtype=dtype).init)(jax.random.key(1), x))
    useful = 2 * 3 * args.tokens * k * d * f
    rows = []
    for impl in ("dense", "ragged"):
        module = MoE(e, k, f, "silu", impl, dtype=dtype)
        forward = jax.jit(lambda p, x, m=module: m.apply(p, x))
        backward = jax.jit(jax.grad(lambda p, x, m=module: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2),
                                    argnums=(0, 1)))
        for what, fn, work in (("forward", forward, useful), ("forward+backward", backward, 3 * useful)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(params, x))
                times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            rows.append({"impl": impl, "pass": what, "ms": 1e3 * s, "first_s": first, "times_s": times,
                         "tokens_per_s": args.tokens / s, "useful_flops_per_s": work / s})
    print(f"MoE block: D {d}, F {f}, {e} experts, top-{k}, {args.tokens} tokens, {args.dtype} "
          f"({device_info()['device_kind']})")
    print("| experts | pass | ms | tokens/s | useful GFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dense = next(x for x in rows if x["impl"] == "dense" and x["pass"] == r["pass"])
        r["speedup_over_dense"] = dense["ms"] / r["ms"]
        print(f"| {r['impl']} | {r['pass']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['useful_flops_per_s'] / 1e9:.1f} | {r['speedup_over_dense']:.2f}x |")
    write_results({"benchmark": "moe", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv,
                   "device": device_info(), "settings": {"hidden": d, "expert_hidden": f, "experts": e, "top_k": k,
                                                         "tokens": args.tokens, "dtype": args.dtype,
                                                         "repeats": args.repeats}, "rows": rows},
                  args.out, optional=("jax", "jaxlib", "flax"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
