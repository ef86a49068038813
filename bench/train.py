"""Benchmark: the mgjax training step (`mgjax.train.step.make_train_step`), per config and remat policy.

Builds the step exactly as `mgjax train` does (`MGM(config, dtype=compute, param_dtype=float32)`, stage-2
trainable set `llm, mm_projector, vlm_uni_`, the loop's AdamW `optimizer`, the towers' stochastic depth
on, `donate_argnums=0`), feeds it synthetic batches (`tests/tiny.py` `batch`, stacked and bucketed by the
loop's `stack` / `batch_lengths`) and reports, per config x remat policy (none | dots | full):

  compile s     lower + compile of the step (once)
  step s        median wall time of --steps steps after --warmup steps (block_until_ready)
  tokens/s      rows x merged length L (text + visual tokens, the compiled length) / step s
  TFLOP/s       XLA's FLOP count of one step / step s. The count is `Lowered.cost_analysis()["flops"]`
                of the same step with the decoder layers unrolled: XLA's cost analysis counts a while
                loop's body once, so the scanned layout (`scan_layers`, what `mgjax train` runs) would
                be undercounted by the number of layers. It includes the remat policy's recomputation
                and the frozen towers' forward pass. The loop's `6 N tokens` estimate is printed too.
  MFU           achieved FLOP/s / the measured matmul ceiling: a jitted chain of square matmuls in the
                compute dtype on the same device (printed in the header), not a vendor peak
  peak memory   accelerators: `memory_stats()["peak_bytes_in_use"]`; CPU: the process's peak RSS
                (ru_maxrss, which includes the Python process, the compiled program and the parameters).
                XLA's `memory_analysis()` of the compiled step (temp = activations and scratch,
                args = state + frozen + batch) shows what the remat policy saves on any backend.

Each case runs in its own child process, so that peaks are per case and one device is never held twice.
Configs: `tiny` is the demo model (`mgjax.train.demo.DEMO_CONFIG`); `100m` keeps the released tower
structure of MGM-7B (CLIP ViT/14 at 336 px: 576 visual tokens; a 4-stage ConvNeXt at 768 px; patch
info mining; the 2-layer GELU projector; a Llama decoder with a 32000 vocabulary) at ~112M parameters.
`--torch` adds a reference row: HF transformers' PyTorch `LlamaForCausalLM` with the LLM's shapes (rows x
L tokens, forward + backward + AdamW), next to the same LLM-only step in JAX (`llm-only` rows).

  python bench/train.py                                   # tiny and 100m, all three policies (2-core CPU: ~12 min)
  python bench/train.py --configs tiny --steps 10         # tiny only (2-core CPU: ~2 min)
  python bench/train.py --configs 100m --remat dots --batch 8 --seq 1536 --dtype bfloat16   # an accelerator

Results go to bench/results/train.json (and a table on stdout).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

from children import ROOT, child, device_info, run_child, write_results  # bench/, the script's folder, is on sys.path

ERROR_KEYS = ("config", "remat", "framework")  # what a failed case's row keeps of its spec
RESULTS = ROOT / "bench" / "results" / "train.json"
GB = 1e9
# Per config: (rows per step, merged length L). L is a length bucket (`mgjax.pretrained.length_bucket`),
# so that the text of --seq - tokens_per_image + 1 ids (one image) fills the compiled length exactly.
DEFAULTS = {"tiny": (8, 256), "100m": (2, 768)}


# --- configs -----------------------------------------------------------------------------------------

def model_config(name: str):
    """The MGMConfig of `name` (remat and layout are set per case)."""
    if name == "tiny":
        from mgjax.train.demo import DEMO_CONFIG

        return DEMO_CONFIG
    if name == "100m":
        from mgjax.presets import preset

        base = preset("MGM-7B")  # CLIP ViT-L/14-336 + ConvNeXt-L at 768 px + Vicuna-7B, scaled down
        vision = dataclasses.replace(base.vision, hidden_size=512, intermediate_size=2048, num_layers=8,
                                     num_heads=8)  # 336 px, patch 14: 24 x 24 = 576 tokens
        aux = dataclasses.replace(base.vision_aux, dims=(48, 96, 192, 384), depths=(3, 3, 9, 3))  # ConvNeXt-T depths
        lm = dataclasses.replace(base.lm, hidden_size=640, num_layers=8, num_heads=10, num_kv_heads=10,
                                 head_dim=64, intermediate_size=1728)  # vocab 32000, SiLU-gated MLP, RoPE
        return dataclasses.replace(base, vision=vision, vision_aux=aux, lm=lm, mm_hidden_size=vision.hidden_size,
                                   mm_hidden_size_aux=aux.out_channels)
    raise SystemExit(f"--configs: unknown config {name!r} (tiny, 100m)")


def with_layout(config, remat: str, scan: bool, loss_chunk: int = 0):
    return dataclasses.replace(config, lm=dataclasses.replace(config.lm, remat=remat, scan_layers=scan,
                                                              loss_chunk=loss_chunk))


def count(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- child processes -------------------------------------------------------------------------------

def _peak_device_bytes() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without allocator statistics
        stats = {}
    return stats.get("peak_bytes_in_use")


def _memory_analysis(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return {}
    if m is None:
        return {}
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if getattr(m, k, None) is not None}


def _flops(cost) -> float | None:
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def child_matmul(spec: dict) -> dict:
    """The matmul ceiling: `reps` dependent [n, n] @ [n, n] products in one jitted call; the best of `calls`."""
    import jax
    import jax.numpy as jnp

    n, reps, dtype = spec["n"], spec["reps"], jnp.dtype(spec["dtype"])
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (n, n), jnp.float32) / n**0.5).astype(dtype)  # keeps the norm: no overflow
    chain = jax.jit(lambda x, w: jax.lax.fori_loop(0, reps, lambda i, x: jnp.dot(x, w), x))
    chain(x, w).block_until_ready()
    times = []
    for _ in range(spec["calls"]):
        t = time.perf_counter()
        chain(x, w).block_until_ready()
        times.append(time.perf_counter() - t)
    flops = 2 * n**3 * reps
    return {**device_info(), "n": n, "reps": reps, "dtype": spec["dtype"], "best_s": min(times),
            "median_s": statistics.median(times), "flops_per_s": flops / min(times),
            "median_flops_per_s": flops / statistics.median(times)}


def matmul_spec(on_cpu: bool, dtype: str, n: int | None = None) -> dict:
    """`child_matmul`'s spec for the ceiling: [n, n] with n = 4096 on a CPU, else 8192; 5 calls of 2 (CPU)
    or 20 chained products, enough to hide the call overhead."""
    return {"n": n or (4096 if on_cpu else 8192), "reps": 2 if on_cpu else 20, "calls": 5, "dtype": dtype}


def _batch(config, rows: int, seq: int, accum: int) -> tuple[dict, int, int]:
    """Stacked [k, ...] host batch of k = `accum` micro-batches of `rows` rows, (text length, merged length)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny  # the tests' synthetic batch: an image at position 3, one right-padded row, ~70% supervised

    from mgjax.train.loop import batch_lengths, stack

    text = seq - config.tokens_per_image + 1
    if text < 5:
        raise SystemExit(f"--seq {seq}: shorter than the {config.tokens_per_image} visual tokens + 4 text ids")
    micro = [tiny.batch(config, rows, text, seed=i) for i in range(accum)]
    t, length = batch_lengths(micro, config)
    return stack(micro, t, 0), t, length


def _abstract_state(module, trainable_prefixes, tx_for):
    """(TrainState, frozen) as ShapeDtypeStructs, and the optimizer for that tree."""
    import jax
    import jax.numpy as jnp

    from mgjax.model import abstract_params
    from mgjax.train.step import TrainState, split_params

    a_train, a_frozen = split_params(abstract_params(module), trainable_prefixes)
    tx = tx_for(a_train)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), a_train, jax.eval_shape(tx.init, a_train))
    return state, a_frozen, tx


def child_step(spec: dict) -> dict:
    """One config x remat policy: compile, time, count FLOPs, memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgjax.model import MGM, init_params, merged_lengths
    from mgjax.train.config import TrainConfig
    from mgjax.train.loop import optimizer
    from mgjax.train.step import TrainState, make_train_step, split_params

    cfg = TrainConfig(run_dir="bench", steps=1000)  # the loop's defaults: AdamW, stage-2 trainable set
    compute = jnp.dtype(spec["dtype"])
    config = with_layout(model_config(spec["config"]), spec["remat"], spec["scan"], spec["loss_chunk"])
    module = MGM(config, dtype=compute, param_dtype=jnp.float32)
    host, t, length = _batch(config, spec["batch"], spec["seq"], spec["accum"])
    rng = jax.random.key(1)  # the towers' stochastic depth, as `mgjax train` runs it

    t0 = time.perf_counter()
    params = init_params(module, jax.random.key(0))
    trainable, frozen = split_params(params, cfg.trainable)
    del params
    tx = optimizer(cfg, trainable)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, jax.jit(tx.init)(trainable))
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    jax.block_until_ready((state, frozen, batch))
    init_s = time.perf_counter() - t0
    n_params, n_trainable = count(state.params) + count(frozen), count(state.params)

    step_fn = jax.jit(make_train_step(module, tx, length, rng), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, frozen, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t0
        losses.append(float(metrics["loss"]))
        if i >= spec["warmup"]:
            times.append(dt)
    if not all(np.isfinite(losses)):
        raise SystemExit(f"{spec['config']} remat={spec['remat']}: non-finite loss {losses}")

    # FLOPs: the unrolled layout's HLO (a while loop's body counts once in XLA's cost analysis), times
    # the micro-batch scan's trip count.
    flops_compiled = _flops(compiled.cost_analysis())
    if spec["scan"]:
        unrolled = MGM(with_layout(config, spec["remat"], False, spec["loss_chunk"]), dtype=compute,
                       param_dtype=jnp.float32)
        a_state, a_frozen, u_tx = _abstract_state(unrolled, cfg.trainable, lambda tree: optimizer(cfg, tree))
        u_low = jax.jit(make_train_step(unrolled, u_tx, length, rng)).lower(a_state, a_frozen, batch)
    else:
        u_low = lowered
    flops = _flops(u_low.cost_analysis())
    flops = None if flops is None else flops * spec["accum"]

    step_s = statistics.median(times)
    rows = spec["batch"] * spec["accum"]
    tokens = rows * length
    valid = int(np.minimum(merged_lengths(host["input_ids"], host["attention_mask"], config.tokens_per_image),
                           length).sum())
    return {**device_info(), "config": spec["config"], "remat": spec["remat"], "loss_chunk": spec["loss_chunk"],
            "layout": "scan" if spec["scan"] else "unrolled", "dtype": spec["dtype"],
            "params": n_params, "trainable_params": n_trainable,
            "params_by_part": {k: count(v) for k, v in {**state.params, **frozen}.items()},
            "rows": rows, "micro_batches": spec["accum"], "text_len": t, "merged_len": length,
            "tokens_per_step": tokens, "valid_tokens_per_step": valid,
            "init_s": init_s, "compile_s": compile_s, "step_times_s": times, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "xla_flops_per_step": flops,
            "xla_flops_per_step_compiled": flops_compiled,
            "model_flops_6n_per_step": 6 * n_params * tokens,
            "achieved_flops_per_s": None if flops is None else flops / step_s,
            "losses": losses, "memory_analysis": _memory_analysis(compiled),
            "peak_bytes_in_use": _peak_device_bytes()}


def _hidden(decoder, ids, positions, valid):
    """A text-only forward to the final-normed hidden states [B, T, D] (the chunked loss applies the head)."""
    return decoder(decoder.embed(ids), positions, valid, hidden_only=True)


def child_llm(spec: dict) -> dict:
    """The LLM alone (text ids [rows, L], forward + backward + AdamW), in JAX or in PyTorch (transformers)."""
    config = with_layout(model_config(spec["config"]), spec["remat"], spec["scan"], spec["loss_chunk"])
    lm, rows, length = config.lm, spec["batch"] * spec["accum"], spec["seq"]
    if spec["framework"] == "torch":
        return _torch_llm(lm, rows, length, spec)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mgjax.lm.decoder import Decoder
    from mgjax.train.loss import chunked_next_token_nll, next_token_nll

    compute = jnp.dtype(spec["dtype"])
    dec = Decoder(lm, dtype=compute, param_dtype=jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, lm.vocab_size, (rows, length)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length), (rows, length))
    valid = jnp.ones((rows, length), bool)
    params = jax.jit(lambda k: dec.init(k, ids[:1, :8], pos[:1, :8], valid[:1, :8], method="forward_ids"))(
        jax.random.key(0))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    tx = optax.adamw(2e-5)
    opt = tx.init(params)

    def step_of(decoder):
        def step(params, opt, ids):
            def loss(p):
                if not lm.loss_chunk:
                    total, n = next_token_nll(decoder.apply({"params": p}, ids, pos, valid, method="forward_ids"),
                                              ids)
                    return total / n
                hidden = decoder.apply({"params": p}, ids, pos, valid, method=_hidden)
                total, n = chunked_next_token_nll(lambda h: decoder.apply({"params": p}, h, method="head"), hidden,
                                                  ids, None, lm.loss_chunk)
                return total / n
            value, grads = jax.value_and_grad(loss)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, value
        return step

    jitted = jax.jit(step_of(dec), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    lowered = jitted.lower(params, opt, ids)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = None
    if not spec["scan"]:
        flops = _flops(lowered.cost_analysis())
    else:
        u_dec = Decoder(dataclasses.replace(lm, scan_layers=False), dtype=compute, param_dtype=jnp.float32)
        u_params = jax.eval_shape(lambda k: u_dec.init(k, ids[:1, :8], pos[:1, :8], valid[:1, :8],
                                                       method="forward_ids"), jax.random.key(0))["params"]
        u_params = jax.tree.map(lambda x: getattr(x, "value", x), u_params, is_leaf=lambda x: hasattr(x, "value"))

        flops = _flops(jax.jit(step_of(u_dec)).lower(u_params, jax.eval_shape(tx.init, u_params), ids).cost_analysis())
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        params, opt, value = compiled(params, opt, ids)
        jax.block_until_ready((params, opt, value))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    n = count(params)
    step_s = statistics.median(times)
    return {**device_info(), "config": spec["config"], "remat": spec["remat"], "loss_chunk": spec["loss_chunk"],
            "framework": "jax",
            "layout": "scan" if spec["scan"] else "unrolled", "dtype": spec["dtype"], "params": n,
            "rows": rows, "merged_len": length, "tokens_per_step": rows * length, "compile_s": compile_s,
            "step_times_s": times, "step_s": step_s, "tokens_per_s": rows * length / step_s,
            "xla_flops_per_step": flops, "model_flops_6n_per_step": 6 * n * rows * length,
            "achieved_flops_per_s": None if flops is None else flops / step_s, "loss": float(value),
            "memory_analysis": _memory_analysis(compiled), "peak_bytes_in_use": _peak_device_bytes()}


def hf_llama_config(lm, length: int, **extra):
    """HF's `LlamaConfig` of the LLM `lm` (SDPA attention) for sequences of up to `length` positions; `extra`:
    more LlamaConfig fields (token ids)."""
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                     num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
                     num_key_value_heads=lm.num_kv_heads, head_dim=lm.head_dim,
                     max_position_embeddings=max(lm.max_position_embeddings, length), rms_norm_eps=lm.norm_eps,
                     rope_theta=lm.rope_theta, tie_word_embeddings=lm.tie_word_embeddings, hidden_act="silu", **extra)
    hf._attn_implementation = "sdpa"
    return hf


def _torch_llm(lm, rows: int, length: int, spec: dict) -> dict:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    if lm.family != "llama":
        raise SystemExit(f"--torch: the reference is LlamaForCausalLM, {spec['config']} has a {lm.family} LLM")
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM(hf_llama_config(lm, length)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    ids = torch.randint(3, lm.vocab_size, (rows, length))
    autocast = spec["dtype"] == "bfloat16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        value = step()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    step_s = statistics.median(times)
    return {"platform": "cpu", "device_kind": "torch cpu", "framework": "torch", "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "config": spec["config"], "remat": "none", "dtype": spec["dtype"] + (" autocast" if autocast else ""),
            "params": n, "rows": rows, "merged_len": length, "tokens_per_step": rows * length,
            "step_times_s": times, "step_s": step_s, "tokens_per_s": rows * length / step_s,
            "model_flops_6n_per_step": 6 * n * rows * length, "loss": value}


# --- main ----------------------------------------------------------------------------------------

def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def _fmt(x, spec: str) -> str:
    return format("-", spec.replace(".", "")[:-2] if spec[-1] in "f%" else spec) if x is None else format(x, spec)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    sys.path.insert(0, str(ROOT))  # this checkout's mgjax
    if argv[:1] == ["_child"]:
        child({"matmul": child_matmul, "step": child_step, "llm": child_llm}, *argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,100m", help="comma-separated: tiny, 100m")
    p.add_argument("--remat", default="none,dots,full", help="comma-separated remat policies: none, dots, full")
    p.add_argument("--batch", type=int, help="rows per micro-batch (default: tiny 8, 100m 2)")
    p.add_argument("--seq", type=int, help="merged length L incl. the visual tokens (default: tiny 256, 100m 768)")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="LMConfig.loss_chunk: the LM head + loss over chunks of this many positions (0: one head)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (the step's scan)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (weights stay float32); auto: float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--layout", choices=["scan", "unrolled"], default="scan",
                   help="decoder layers under nn.scan (mgjax train's default) or unrolled")
    p.add_argument("--matmul-size", type=int, help="side of the ceiling's square matmul (default: CPU 4096, else 8192)")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="PyTorch LlamaForCausalLM reference (and the JAX LLM-only step) per config")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    configs = [c for c in args.configs.split(",") if c]
    policies = [r for r in args.remat.split(",") if r]
    for c in configs:
        model_config(c)
    for r in policies:
        if r not in ("none", "dots", "full"):
            raise SystemExit(f"--remat: {r!r} is not one of none, dots, full")
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # children take what they use, one at a time

    probe = run_child(__file__, "matmul", {"n": 256, "reps": 1, "calls": 1, "dtype": "float32"}, env, ERROR_KEYS)
    if "error" in probe:
        raise SystemExit(f"cannot start JAX: {probe['error']}")
    on_cpu = probe["platform"] == "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    mm_spec = matmul_spec(on_cpu, dtype, args.matmul_size)
    n = mm_spec["n"]
    print(f"device: {probe['device_kind']} ({probe['platform']}, {probe['device_count']} device(s)), "
          f"jax {probe['jax']}, compute dtype {dtype}, {os.cpu_count()} CPUs", flush=True)
    ceilings = [run_child(__file__, "matmul", mm_spec, env, ERROR_KEYS)]
    if "error" in ceilings[0]:
        raise SystemExit(f"matmul ceiling: {ceilings[0]['error']}")
    print(f"matmul ceiling (before): {ceilings[0]['flops_per_s'] / 1e12:.3f} TFLOP/s ({n} x {n} {dtype}, best of "
          f"5 calls of {mm_spec['reps']} chained products)", flush=True)
    rows = []
    for c in configs:
        batch, seq = args.batch or DEFAULTS[c][0], args.seq or DEFAULTS[c][1]
        for r in policies:
            spec = {"config": c, "remat": r, "batch": batch, "seq": seq, "accum": args.accum, "steps": args.steps,
                    "warmup": args.warmup, "dtype": dtype, "scan": args.layout == "scan", "loss_chunk": args.loss_chunk}
            print(f"{c} remat={r}: batch {batch} x {args.accum}, L {seq} ...", flush=True)
            row = run_child(__file__, "step", spec, env, ERROR_KEYS)
            row["kind"] = "mgm"
            rows.append(row)
            if "error" in row:
                print(f"  failed: {row['error']}", flush=True)
                continue
            print(f"  {row['params'] / 1e6:.1f}M params ({row['trainable_params'] / 1e6:.1f}M trainable), "
                  f"compile {row['compile_s']:.1f} s, step {row['step_s']:.3f} s", flush=True)
        if args.torch:
            llm_remat = "none" if "none" in policies or not policies else policies[0]
            for fw in ("jax", "torch"):
                spec = {"config": c, "remat": llm_remat, "batch": batch, "seq": seq, "accum": args.accum,
                        "steps": args.steps, "warmup": args.warmup, "dtype": dtype, "scan": args.layout == "scan",
                        "framework": fw, "loss_chunk": args.loss_chunk}
                print(f"{c} LLM only ({fw}) ...", flush=True)
                env_fw = env if fw == "jax" else {**env, "CUDA_VISIBLE_DEVICES": ""}
                row = run_child(__file__, "llm", spec, env_fw, ERROR_KEYS)
                row["kind"] = f"llm-only {fw}"
                rows.append(row)
                if "error" in row:
                    print(f"  failed: {row['error']}", flush=True)

    # again: other load on the machine only lowers a measurement
    after = run_child(__file__, "matmul", mm_spec, env, ERROR_KEYS)
    if "error" not in after:
        ceilings.append(after)
        print(f"matmul ceiling (after): {after['flops_per_s'] / 1e12:.3f} TFLOP/s", flush=True)
    ceiling = max(ceilings, key=lambda c: c["flops_per_s"])
    peak = ceiling["flops_per_s"]
    for row in rows:
        if "error" in row:
            continue
        ach = row.get("achieved_flops_per_s")
        row["mfu"] = None if ach is None else ach / peak
        row["mfu_6n"] = row["model_flops_6n_per_step"] / row["step_s"] / peak
        if row.get("peak_bytes_in_use") is not None:
            row["peak_memory"] = {"bytes": row["peak_bytes_in_use"], "what": "device peak_bytes_in_use"}
        else:
            row["peak_memory"] = {"bytes": row["ru_maxrss_bytes"], "what": "process peak RSS (ru_maxrss)"}

    what = sorted({r["peak_memory"]["what"] for r in rows if "peak_memory" in r})
    head = (f"{'config':<6} {'kind':<14} {'remat':<5} {'params':>7} {'rows':>4} {'L':>5} {'compile s':>9} "
            f"{'step s':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'6N TFLOP/s':>10} {'MFU':>6} {'MFU 6N':>6} "
            f"{'peak GB':>7} {'XLA temp GB':>11} {'XLA args GB':>11}")
    print()
    print(f"matmul ceiling {peak / 1e12:.3f} TFLOP/s ({n}^2 {dtype} on {probe['device_kind']}, best of before/after); "
          f"peak GB = {', '.join(what)}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r.get('config', ''):<6} {r['kind']:<14} {r.get('remat') or '':<5} failed: {r['error']}")
            continue
        ma = r.get("memory_analysis") or {}
        ach = r.get("achieved_flops_per_s")
        print(f"{r['config']:<6} {r['kind']:<14} {r['remat']:<5} {r['params'] / 1e6:>6.1f}M {r['rows']:>4} "
              f"{r['merged_len']:>5} {_fmt(r.get('compile_s'), '>9.1f')} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>9.0f} {_fmt(ach and ach / 1e12, '>8.3f')} "
              f"{r['model_flops_6n_per_step'] / r['step_s'] / 1e12:>10.3f} "
              f"{_fmt(r.get('mfu'), '>6.1%')} {r['mfu_6n']:>6.1%} "
              f"{_fmt_bytes(r['peak_memory']['bytes']):>7} {_fmt_bytes(ma.get('temp_size_in_bytes')):>11} "
              f"{_fmt_bytes(ma.get('argument_size_in_bytes')):>11}")

    from importlib.metadata import version

    result = {
        "benchmark": "train", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": [sys.executable, *sys.argv],
        "device": {k: probe[k] for k in ("platform", "device_kind", "device_count")}, "dtype": dtype,
        "layout": args.layout,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)},
        "versions": {"python": platform.python_version(),
                     **{m: version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy")}},
        "matmul_ceiling": {"flops_per_s": peak, "n": n, "dtype": dtype,
                           "what": "best of the measurements before and after the cases", "runs": ceilings},
        "notes": ["xla_flops_per_step: Lowered.cost_analysis() of the step with unrolled decoder layers (XLA "
                  "counts a while loop's body once); includes remat recomputation and the frozen towers' forward",
                  "tokens = rows x merged length L (compiled length, incl. visual tokens)",
                  "MFU = achieved FLOP/s / the measured matmul ceiling (not a vendor peak)",
                  "peak memory on CPU: the child process's ru_maxrss (whole process)"],
        "rows": rows,
    }
    write_results(result, args.out, optional=("torch", "transformers"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
