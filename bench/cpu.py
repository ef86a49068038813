"""Benchmark: mgjax beside HF transformers' PyTorch modules of the same shapes, on this CPU, as speed ratios
measured in one run (issue [cpu]).

The model is bench/train.py's `100m` (MGM-7B's structure scaled down: CLIP ViT 512 wide x 8 layers at
336 px, ConvNeXt 48..384 wide at 768 px, a Llama 640 wide x 8 layers, vocabulary 32000), float32, random
weights. Every case runs in a fresh process (its peak RSS is its own), mgjax and PyTorch alternating, each
case --repeats times; the tables report medians. PyTorch uses as many threads as XLA does (the CPUs here).

Rows (each side's time for the same work; ratio = PyTorch's time / mgjax's, > 1 = mgjax faster):

  encode B      B images to visual tokens: mgjax `MGM.encode_images` (CLIP, ConvNeXt, patch info mining, the
                projector) vs HF `CLIPVisionModel` + `ConvNextModel` and the original's mining and projector
                in PyTorch (`_torch_mining`: the multi-stage map, the windows, one-head attention)
  prompt B      the LLM over B prompts of --prompt merged tokens into a fresh KV cache, the last position's
                logits (generation's prefill): mgjax at its length bucket, left-padded, vs HF
                `LlamaForCausalLM(inputs_embeds=..., logits_to_keep=1)`
  decode B      one greedy step over that cache (median of --decode-steps consecutive steps, one call each)
  train         the LLM's training step, 2 rows x 768 tokens, loss + backward + AdamW (bench/train.py's
                `child_llm`: mgjax scanned layers, no remat, one head; HF with SDPA)

With --parts, the same two processes also time the LLM's parts at the train shapes, forward + backward,
each jitted alone / run eagerly (the per-op table: where the train step's time goes on each side):
attention (the score / softmax / value products for 10 heads of 64), the SwiGLU MLP, RMSNorm, the LM head
with the cross-entropy, rotary embedding.

  python bench/cpu.py                      # every row, 1 repeat (2-core CPU: about 10 minutes)
  python bench/cpu.py --repeats 3 --parts  # the issue's protocol, and the per-op table
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from children import ROOT, child, run_child, timed, write_results  # noqa: E402
from train import child_llm, hf_llama_config, model_config  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ERROR_KEYS = ("row", "framework")
TRAIN_ROWS, TRAIN_LEN = 2, 768


def cpu_info() -> dict:
    """The CPU's model and the instruction-set flags that decide XLA's and PyTorch's kernels."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return {"model": model, "flags": [f for f in wanted if f in flags], "cpus": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _config():
    return model_config("100m")


def _timed(fn, reps: int) -> list[float]:
    fn()  # compile / warm up
    return timed(fn, reps)


# --- mgjax -------------------------------------------------------------------------------------------

def _host_params(init, *args):
    """Random float32 parameters of `init(*args)`'s shapes, drawn on the host one array at a time: the jitted
    random init holds ~0.8 GB of temporaries for the 100m LLM (threefry bits of its two 32000-row tables),
    which is the bench's setup, not the work, and would be the largest part of mgjax's peak RSS."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = nn.unbox(jax.eval_shape(init, *args))
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.02), shapes)


def _jax_row(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgjax.lm.decoder import Decoder, init_cache
    from mgjax.model import MGM, _init_fn
    from mgjax.pretrained import length_bucket

    config, row, b = _config(), spec["row"], spec.get("batch", 1)
    rng = np.random.default_rng(0)
    if row == "encode":
        module = MGM(config)
        params = _host_params(_init_fn(module), jax.random.key(0))
        images = jnp.asarray(rng.uniform(-1, 1, (b, config.image_size, config.image_size, 3)), jnp.float32)
        aux = jnp.asarray(rng.uniform(-1, 1, (b, config.image_size_aux, config.image_size_aux, 3)), jnp.float32)
        encode = jax.jit(lambda p, im, ax: module.apply({"params": p}, im, ax, method=MGM.encode_images))
        return {"times_s": _timed(lambda: encode(params, images, aux).block_until_ready(), spec["reps"])}
    lm = config.lm
    decoder = Decoder(lm)
    length = spec["prompt"]
    bucket = length_bucket(length, lm.max_position_embeddings)
    slots = bucket + spec["decode_steps"] + 1
    ids = jnp.zeros((1, 8), jnp.int32)
    params = _host_params(lambda k: decoder.init(k, ids, jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool),
                                                 method="forward_ids"), jax.random.key(0))["params"]
    embeds = jnp.asarray(rng.standard_normal((b, bucket, lm.hidden_size)) * 0.02, jnp.float32)
    prompt_valid = jnp.broadcast_to(jnp.arange(bucket) >= bucket - length, (b, bucket))  # left-padded
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
    valid = jnp.concatenate([prompt_valid, jnp.ones((b, slots - bucket), bool)], axis=1)

    def prompt(p, e):
        logits, cache = decoder.apply({"params": p}, e, positions, valid, cache=init_cache(lm, b, slots, jnp.float32),
                                      index=0, last_only=True)
        return logits[:, 0], cache

    prompt = jax.jit(prompt)
    if row == "prompt":
        return {"times_s": _timed(lambda: jax.block_until_ready(prompt(params, embeds)), spec["reps"]),
                "bucket": bucket}

    def step(p, cache, token, position, index):
        e = decoder.apply({"params": p}, token[:, None], method="embed")
        logits, cache = decoder.apply({"params": p}, e, position[:, None], valid, cache=cache, index=index,
                                      last_only=True)
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

    step = jax.jit(step, donate_argnums=1)
    logits, cache = prompt(params, embeds)
    token, position = jnp.argmax(logits, -1).astype(jnp.int32), positions[:, -1] + 1
    token, cache = step(params, cache, token, position, jnp.int32(bucket))  # compile
    times = []
    for i in range(1, spec["decode_steps"]):
        t0 = time.perf_counter()
        token, cache = step(params, cache, token, position + i, jnp.int32(bucket + i))
        token.block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"times_s": times}


def _jax_parts(reps: int) -> dict:
    """ms of forward + backward of each LLM part at the train shapes, jitted alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgjax.layers.attention import _causal, causal_mask
    from mgjax.layers.common import RMSNorm, dense
    from mgjax.layers.mlp import GatedMLP
    from mgjax.layers.rope import apply_rope, rope_tables
    from mgjax.train.loss import next_token_nll

    lm, b, t = _config().lm, TRAIN_ROWS, TRAIN_LEN
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, t, lm.hidden_size)), jnp.float32)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, lm.head_dim)), jnp.float32)
               for h in (lm.num_heads, lm.num_kv_heads, lm.num_kv_heads))
    mask = causal_mask(jnp.ones((b, t), bool))
    ids = jnp.asarray(rng.integers(0, lm.vocab_size, (b, t)), jnp.int32)
    head = dense(lm.vocab_size, ("embed", "vocab"), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                 name="lm_head")
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(t), (b, t)), lm.head_dim, lm.rope_theta)
    mlp, norm = GatedMLP(lm.intermediate_size, lm.activation), RMSNorm(lm.norm_eps)
    mlp_p, norm_p = mlp.init(jax.random.key(0), x)["params"], norm.init(jax.random.key(0), x)["params"]
    head_p = head.init(jax.random.key(0), x)["params"]
    parts = {
        "attention": (lambda q, k, v: jnp.sum(_causal(q, k, v, mask, jnp.float32) ** 2), (q, k, v)),
        "mlp": (lambda p, x: jnp.sum(mlp.apply({"params": p}, x) ** 2), (mlp_p, x)),
        "rmsnorm": (lambda p, x: jnp.sum(norm.apply({"params": p}, x) ** 2), (norm_p, x)),
        "head + loss": (lambda p, x: next_token_nll(head.apply({"params": p}, x), ids)[0], (head_p, x)),
        "rope": (lambda q, k: jnp.sum(apply_rope(q, cos, sin) * apply_rope(k, cos, sin)), (q, k)),
    }
    out = {}
    for name, (fn, args) in parts.items():
        grad = jax.jit(jax.grad(fn, argnums=tuple(range(len(args)))))
        out[name] = 1e3 * statistics.median(_timed(lambda: jax.block_until_ready(grad(*args)), reps))
    return out


# --- PyTorch -----------------------------------------------------------------------------------------

def _torch_mining(config):
    """The original's patch info mining and projector (its `unified_resampler` and `mm_projector`, the
    computation of docs/mgm_spec.md section 5) in PyTorch, for the encode row's PyTorch side."""
    import torch
    from torch import nn

    class Mining(nn.Module):
        def __init__(self):
            super().__init__()
            c, ca, h = config.mm_hidden_size, config.mm_hidden_size_aux, config.lm.hidden_size
            self.query = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c))
            self.key, self.value = (nn.Sequential(nn.LayerNorm(ca), nn.Linear(ca, c)) for _ in range(2))
            self.projector = nn.Sequential(nn.Linear(c, h), nn.GELU(), nn.Linear(h, h))

        def forward(self, low, stages):  # low [B, N, C]; stages: the ConvNeXt's 4 maps [B, Ci, Hi, Wi]
            size = stages[0].shape[-2:]
            high = torch.cat([stages[0], *(nn.functional.interpolate(s, size=size, mode="bilinear",
                                                                     align_corners=False) for s in stages[1:])], 1)
            b, n, c = low.shape
            p = int(n ** 0.5)
            m = high.shape[-1] // p
            windows = high.reshape(b, -1, p, m, p, m).permute(0, 2, 4, 3, 5, 1).reshape(b, n, m * m, -1)
            q, k, v = self.query(low), self.key(windows), self.value(windows)
            att = (q[:, :, None] @ (k.transpose(-1, -2) / k.shape[-1] ** 0.5)).nan_to_num()
            return self.projector(low + (att.softmax(-1) @ v)[:, :, 0])

    return Mining()


def _torch_row(spec: dict) -> dict:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config, row, b = _config(), spec["row"], spec.get("batch", 1)
    if row == "encode":
        v, a = config.vision, config.vision_aux
        clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=config.image_size, patch_size=v.patch_size,
            hidden_act="quick_gelu")).eval()
        convnext = ConvNextModel(ConvNextConfig(hidden_sizes=list(a.dims), depths=list(a.depths))).eval()
        mine = _torch_mining(config).eval()
        images = torch.rand(b, 3, config.image_size, config.image_size) * 2 - 1
        aux = torch.rand(b, 3, config.image_size_aux, config.image_size_aux) * 2 - 1

        @torch.no_grad()
        def encode():
            low = clip(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
            stages = convnext(pixel_values=aux, output_hidden_states=True).hidden_states[1:]
            return mine(low, stages)

        return {"times_s": _timed(encode, spec["reps"])}
    lm = config.lm
    model = LlamaForCausalLM(hf_llama_config(lm, spec["prompt"] + spec["decode_steps"])).eval()
    embeds = torch.randn(b, spec["prompt"], lm.hidden_size) * 0.02

    @torch.no_grad()
    def prompt():
        return model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

    if row == "prompt":
        return {"times_s": _timed(prompt, spec["reps"])}
    out = prompt()
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    with torch.no_grad():
        for i in range(spec["decode_steps"]):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            if i:  # the first step is the warm-up, as mgjax's compile step
                times.append(time.perf_counter() - t0)
    return {"times_s": times}


def _torch_parts(reps: int) -> dict:
    import torch
    from transformers.models.llama.modeling_llama import (LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb)

    torch.set_num_threads(os.cpu_count() or 1)
    lm, b, t = _config().lm, TRAIN_ROWS, TRAIN_LEN
    hf = hf_llama_config(lm, TRAIN_LEN)
    x = torch.randn(b, t, lm.hidden_size, requires_grad=True)
    q, k, v = (torch.randn(b, h, t, lm.head_dim, requires_grad=True)
               for h in (lm.num_heads, lm.num_kv_heads, lm.num_kv_heads))
    ids = torch.randint(0, lm.vocab_size, (b, t))
    head = torch.nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
    mlp, norm = LlamaMLP(hf), LlamaRMSNorm(lm.hidden_size, lm.norm_eps)
    cos, sin = LlamaRotaryEmbedding(hf)(x, torch.arange(t)[None].expand(b, t))

    def loss_head():
        logits = head(x).float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, lm.vocab_size), ids[:, 1:].reshape(-1))

    def rope():
        qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
        return (qr * kr).sum()

    parts = {
        "attention": lambda: (torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) ** 2).sum(),
        "mlp": lambda: (mlp(x) ** 2).sum(),
        "rmsnorm": lambda: (norm(x) ** 2).sum(),
        "head + loss": loss_head,
        "rope": rope,
    }
    out = {}
    for name, fn in parts.items():
        def run():
            fn().backward()
            for p in (x, q, k, v, *head.parameters(), *mlp.parameters(), *norm.parameters()):
                p.grad = None
        out[name] = 1e3 * statistics.median(_timed(run, reps))
    return out


# --- cases -------------------------------------------------------------------------------------------

def child_case(spec: dict) -> dict:
    if spec["row"] == "train":
        r = child_llm({"config": "100m", "remat": "none", "scan": True, "loss_chunk": 0, "batch": TRAIN_ROWS,
                       "accum": 1, "seq": TRAIN_LEN, "framework": "jax" if spec["framework"] == "mgjax" else "torch",
                       "dtype": "float32", "warmup": 1, "steps": spec["reps"]})
        out = {"times_s": r["step_times_s"]}
    elif spec["framework"] == "mgjax":
        out = _jax_row(spec)
    else:
        out = _torch_row(spec)
    if spec.get("parts"):
        out["parts_ms"] = (_jax_parts if spec["framework"] == "mgjax" else _torch_parts)(spec["reps"])
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(ROOT))  # this checkout's mgjax
    if argv[:1] == ["_child"]:
        child({"case": child_case}, *argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="encode 1,encode 4,prompt 1,prompt 4,decode 1,decode 4,train",
                   help="comma-separated rows (a kind and a batch)")
    p.add_argument("--prompt", type=int, default=343, help="merged prompt tokens (the issue's 343)")
    p.add_argument("--decode-steps", type=int, default=33, help="decode steps per case (the first is a warm-up)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per case (the median is reported)")
    p.add_argument("--repeats", type=int, default=1, help="processes per case and framework, alternating")
    p.add_argument("--parts", action="store_true", help="the per-part forward + backward table too")
    p.add_argument("--out", default=str(RESULTS / "cpu.json"))
    args = p.parse_args(argv)
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    info = cpu_info()
    print(f"CPU: {info['model']}, {info['cpus']} CPUs, flags {' '.join(info['flags'])}; "
          f"XLA_FLAGS={info['xla_flags']!r}", flush=True)
    rows = []
    cases = [(r.split()[0], int(r.split()[1]) if len(r.split()) > 1 else 1) for r in args.rows.split(",") if r]
    if args.parts and not any(kind == "train" for kind, _ in cases):
        cases.append(("train", 1))
    for kind, batch in cases:
        result = {"row": kind, "batch": batch, "runs": {}}
        for i in range(args.repeats):
            for fw in ("mgjax", "torch") if i % 2 == 0 else ("torch", "mgjax"):
                spec = {"row": kind, "batch": batch, "framework": fw, "prompt": args.prompt, "reps": args.reps,
                        "decode_steps": args.decode_steps, "parts": args.parts and kind == "train"}
                run = run_child(__file__, "case", spec, env, ERROR_KEYS)
                result["runs"].setdefault(fw, []).append(run)
                if "error" in run:
                    print(f"  {kind} {batch} {fw} failed: {run['error']}", flush=True)
        for fw, runs in result["runs"].items():
            ok = [r for r in runs if "error" not in r]
            result[fw] = {"s": statistics.median(statistics.median(r["times_s"]) for r in ok) if ok else None,
                          "rss_bytes": max((r["ru_maxrss_bytes"] for r in ok), default=None)}
            if ok and "parts_ms" in ok[0]:
                result[fw]["parts_ms"] = {k: statistics.median(r["parts_ms"][k] for r in ok) for k in ok[0]["parts_ms"]}
        j, t = result["mgjax"]["s"], result["torch"]["s"]
        result["speed"] = t / j if j and t else None
        rows.append(result)
        speed = "-" if result["speed"] is None else f"{result['speed']:.2f}x"
        print(f"{kind} {batch}: mgjax {_ms(j)} ms, PyTorch {_ms(t)} ms, speed {speed}", flush=True)
    lines = [f"CPU: {info['model']} ({info['cpus']} CPUs; {' '.join(info['flags'])}); float32; "
             f"XLA_FLAGS={info['xla_flags'] or '(none)'}", "",
             "| row | mgjax ms | PyTorch ms | speed (PyTorch / mgjax) | mgjax peak RSS GB | PyTorch peak RSS GB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speed = "-" if r["speed"] is None else f"{r['speed']:.2f}x"
        label = r["row"] if r["row"] == "train" else f"{r['row']} B={r['batch']}"
        lines.append(f"| {label} | {_ms(r['mgjax']['s'])} | {_ms(r['torch']['s'])} | {speed} | "
                     f"{_gb(r['mgjax']['rss_bytes'])} | {_gb(r['torch']['rss_bytes'])} |")
    parts = next((r for r in rows if "parts_ms" in r["mgjax"] and "parts_ms" in r["torch"]), None)
    if parts:
        lines += ["", f"| part (forward + backward, {TRAIN_ROWS} x {TRAIN_LEN}) | mgjax ms | PyTorch ms | "
                  "mgjax - PyTorch ms |", "|---|---|---|---|"]
        jp, tp = parts["mgjax"]["parts_ms"], parts["torch"]["parts_ms"]
        for k in sorted(jp, key=lambda k: tp[k] - jp[k]):
            lines.append(f"| {k} | {jp[k]:.1f} | {tp[k]:.1f} | {jp[k] - tp[k]:+.1f} |")
    print("\n".join(["", *lines]))
    write_results({"cpu": info, "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows,
                   "table": lines}, args.out, optional=("jax", "jaxlib", "torch", "transformers"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
