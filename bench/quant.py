"""Benchmark: weight-only quantised inference (`load_pretrained(quantize=...)`, issue #22): float vs int8 vs
int4 per case, each load in its own process (its peak RSS is its own).

Quality (the model loaded float32, the quantised ones computing in float32 on their dequantised weights):
  top-1 agreement  the argmax of the quantised model's logits equal to the float model's, over every text
                   position of PROMPTS (one chat prompt per question, no image; >= 256 positions per case)
  first 8 equal    prompts whose 8 greedy tokens equal the float model's, of len(PROMPTS)
Memory:
  LLM weight ratio the LLM's parameter bytes (`mgjax.quant.weight_bytes`: int8 / uint8 values, float scales,
                   norms and router) over the same LLM in bfloat16; the load in --dtype (scales in it)
  peak / held RSS  the loading process's peak RSS (VmHWM) and its anonymous resident memory after loading
                   (RssAnon: the heap, mapped checkpoint pages apart)

Cases: the golden fixtures (tests/fixtures/mgm_reference: random tiny released-layout checkpoints), the demo
run (runs/demo/stage2, a trained tiny model, when `make demo` made it: its held-out accuracy too), a tiny
random LLM of every family (tests/tiny.py; quality only, the decoder alone, Mixtral with both MoE impls), a
synthetic mgjax checkpoint of bench/train.py's `100m` config (random) loaded in bfloat16 (memory only: its
random weights give no meaningful top-1), and the released presets' LLM weight ratios from their abstract
parameters (nothing allocated).

  python bench/quant.py                    # everything (2-core CPU: about 7 minutes)
  python bench/quant.py --skip-100m        # without the 100m checkpoint (about 300 MB written to a temp dir)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from children import ROOT, child, run_child, write_results  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOLDEN = ROOT / "tests" / "fixtures" / "mgm_reference"
GOLDEN_CASES = {"llama_vicuna": "MGM-7B-tiny", "gemma": "MGM-2B-tiny", "llama_vicuna_bf16": "MGM-7B-tiny"}
DEMO = ROOT / "runs" / "demo" / "stage2"
MODES = ("none", "int8", "int4")
PRESETS = ("MGM-2B", "MGM-7B", "MGM-13B", "MGM-8B", "MGM-34B", "MGM-8x7B")
PROMPTS = ("What is unusual about this image? Describe every detail you can see in it, one by one.",
           "Tell me a long story about a cat who lives on a boat and sails across the seas to find its home.",
           "List the colours of the rainbow in order and explain why the sky looks blue during the day.",
           "Write a short poem about the mountains in winter, the snow on the trees and the quiet valleys.",
           "How do I cook rice so that it does not stick to the pot? Give the steps and the amounts of water.",
           "Explain to a child what a computer does when it runs a program, using a kitchen as the example.")
ERROR_KEYS = ("case", "mode")


def _rss() -> dict:
    """VmHWM and RssAnon of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child_load(spec: dict) -> dict:
    """One checkpoint loaded as `spec["mode"]`: its weight bytes, RSS, and (quality) the top-1 tokens over the
    prompts' positions and each prompt's first 8 greedy tokens."""
    import numpy as np

    import mgjax
    from mgjax.checkpoint import _trim_heap
    from mgjax.quant import llm_bytes, weight_bytes

    kw = dict(spec.get("load", {}))
    t = time.perf_counter()
    model = mgjax.load_pretrained(spec["path"], dtype=spec["dtype"],
                                  quantize=None if spec["mode"] == "none" else spec["mode"], **kw)
    load_s = time.perf_counter() - t
    gc.collect()
    _trim_heap()  # freed heap (the float chunks, the compiler's scratch) handed back before RssAnon is read
    row = {"load_s": load_s, **{f"after_load_{k}": v for k, v in _rss().items()},
           "llm_bytes": weight_bytes(model.params), "llm_bf16_bytes": llm_bytes(model.config, "none")}
    if spec["quality"]:
        top1, greedy = [], []
        for q in PROMPTS:
            ids, images, aux = model.prompt_inputs(q, [])
            top1 += np.asarray(model.logits(ids[None], images, aux))[0].argmax(-1).tolist()
            greedy.append(model.generate([ids], images, aux, max_new_tokens=8).token_ids[0].tolist())
        row.update(top1=top1, greedy=greedy)
    if spec.get("heldout"):
        from mgjax.train.demo import heldout_accuracy

        row["heldout_accuracy"] = heldout_accuracy(model.module, model.params, model.tokenizer, model.config,
                                                   num_samples=256)[0]
    return row


def child_families(spec: dict) -> dict:
    """A tiny random LLM of every family (tests/tiny.py), float32 vs quantised on one batch of random ids: the
    top-1 agreement over its positions and the logits' max error relative to their scale."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgjax.lm.decoder import Decoder
    from mgjax.quant import quantize_params

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    rng = np.random.default_rng(0)
    rows = {}
    for name in (*tiny.LMS, "mixtral_ragged"):
        config = tiny.lm(name.split("_ragged")[0], moe_impl="ragged" if name.endswith("ragged") else "dense")
        ids = jnp.asarray(rng.integers(0, config.vocab_size, (4, 64)), jnp.int32)
        positions, valid = jnp.broadcast_to(jnp.arange(64), ids.shape), jnp.ones(ids.shape, bool)
        params = nn.unbox(jax.jit(Decoder(config).init, static_argnames="method")(
            jax.random.key(1), ids, positions, valid, method=Decoder.forward_ids)["params"])
        ref = Decoder(config).apply({"params": params}, ids, positions, valid, method=Decoder.forward_ids)
        rows[name] = {}
        for mode in MODES[1:]:
            q = quantize_params({"llm": params}, mode)["llm"]
            out = Decoder(dataclasses.replace(config, quant=mode)).apply({"params": q}, ids, positions, valid,
                                                                          method=Decoder.forward_ids)
            rows[name][mode] = {"top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
                                "positions": int(ids.size),
                                "max_rel_error": float(jnp.abs(out - ref).max() / jnp.abs(ref).max())}
    return {"families": rows}


def child_presets(spec: dict) -> dict:
    """The released presets' LLM bytes per mode, from abstract parameters (bfloat16 floats)."""
    from mgjax.presets import preset
    from mgjax.quant import llm_bytes

    return {"presets": {name: {mode: llm_bytes(preset(name), mode) for mode in MODES} for name in PRESETS}}


def child_write_100m(spec: dict) -> dict:
    """An mgjax checkpoint (as `mgjax convert` writes one) of bench/train.py's `100m` config: random bf16."""
    import dataclasses
    import json

    import jax
    import jax.numpy as jnp

    from mgjax.checkpoint import save_streaming
    from mgjax.config import config_to_dict
    from mgjax.convert.mgjax_ckpt import FORMAT_VERSION, MGJAX_CONFIG, PARAMS
    from mgjax.model import MGM, init_params
    from train import model_config

    config = dataclasses.replace(model_config("100m"), template="vicuna_v1")
    folder = Path(spec["path"])
    save_streaming(folder / PARAMS, [{"params": init_params(MGM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
                                                           jax.random.key(0))}])
    (folder / MGJAX_CONFIG).write_text(json.dumps({"format": "mgjax", "format_version": FORMAT_VERSION,
                                                   "dtype": "bfloat16", "config": config_to_dict(config)}))
    return {}


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def _quality(run: dict, ref: dict) -> dict:
    """Top-1 agreement and first-8-equal counts of `run` against the float run `ref`."""
    import numpy as np

    a, b = np.asarray(run["top1"]), np.asarray(ref["top1"])
    return {"top1_agreement": float((a == b).mean()), "positions": len(b),
            "first8_equal": sum(x == y for x, y in zip(run["greedy"], ref["greedy"])), "prompts": len(ref["greedy"])}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(ROOT))  # this checkout's mgjax
    if argv[:1] == ["_child"]:
        child({"load": child_load, "families": child_families, "presets": child_presets,
               "write_100m": child_write_100m}, *argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-100m", action="store_true", help="leave out the synthetic 100m checkpoint")
    p.add_argument("--out", default=str(RESULTS / "quant.json"))
    args = p.parse_args(argv)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    cases = [{"case": c, "path": str(GOLDEN / c / d), "dtype": "float32", "quality": True}
             for c, d in GOLDEN_CASES.items()]
    if DEMO.is_dir():
        cases.append({"case": "demo (trained)", "path": str(DEMO), "dtype": "float32", "quality": True,
                      "heldout": True})
    tmp = tempfile.TemporaryDirectory(prefix="mgjax-bench-quant-")
    if not args.skip_100m:
        print("writing the synthetic 100m checkpoint ...", flush=True)
        folder = str(Path(tmp.name) / "100m")
        run_child(__file__, "write_100m", {"case": "100m", "mode": "-", "path": folder}, env, ERROR_KEYS)
        cases.append({"case": "100m (bf16)", "path": folder, "dtype": "bfloat16", "quality": False})
    rows = []
    for case in cases:
        runs = {}
        for mode in MODES:
            runs[mode] = run_child(__file__, "load", {**case, "mode": mode}, env, ERROR_KEYS)
            if "error" in runs[mode]:
                print(f"  {case['case']} {mode} failed: {runs[mode]['error']}", flush=True)
        row = {"case": case["case"], "dtype": case["dtype"], "modes": {}}
        for mode, run in runs.items():
            if "error" in run:
                row["modes"][mode] = run
                continue
            m = {"llm_bytes": run["llm_bytes"], "ratio_vs_bf16": run["llm_bytes"] / run["llm_bf16_bytes"],
                 "peak_rss_bytes": run["ru_maxrss_bytes"],
                 "after_load_peak_rss_bytes": run.get("after_load_VmHWM"),
                 "after_load_anon_bytes": run.get("after_load_RssAnon"), "load_s": run["load_s"]}
            if case["quality"] and mode != "none" and "error" not in runs["none"]:
                m.update(_quality(run, runs["none"]))
            if "heldout_accuracy" in run:
                m["heldout_accuracy"] = run["heldout_accuracy"]
            row["modes"][mode] = m
        rows.append(row)
        print(f"{case['case']}: " + ", ".join(
            f"{mode} {m.get('ratio_vs_bf16', 0):.3f}x" + (f" top-1 {m['top1_agreement']:.3f}" if "top1_agreement" in m
                                                         else "") for mode, m in row["modes"].items()), flush=True)
    tmp.cleanup()
    families = run_child(__file__, "families", {"case": "families", "mode": "-"}, env, ERROR_KEYS)
    presets = run_child(__file__, "presets", {"case": "presets", "mode": "-"}, env, ERROR_KEYS)

    lines = ["| case | mode | LLM weights MB | vs bf16 | top-1 agreement | first 8 equal | peak RSS after load GB | "
             "heap after load GB | extra |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode, m in r["modes"].items():
            if "error" in m:
                lines.append(f"| {r['case']} | {mode} | error: {m['error']} |||||||")
                continue
            agree = f"{m['top1_agreement']:.3f} of {m['positions']}" if "top1_agreement" in m else "-"
            first8 = f"{m['first8_equal']} / {m['prompts']}" if "first8_equal" in m else "-"
            extra = f"held-out acc {m['heldout_accuracy']:.3f}" if "heldout_accuracy" in m else ""
            lines.append(f"| {r['case']} ({r['dtype']}) | {mode} | {m['llm_bytes'] / 1e6:.3g} | "
                         f"{m['ratio_vs_bf16']:.3f}x | {agree} | {first8} | {_gb(m['after_load_peak_rss_bytes'])} | "
                         f"{_gb(m['after_load_anon_bytes'])} | {extra} |")
    if "families" in families:
        lines += ["", "| tiny family (decoder, 4 x 64 random ids) | int8 top-1 | int8 max rel err | int4 top-1 | "
                  "int4 max rel err |", "|---|---|---|---|---|"]
        for name, f in families["families"].items():
            lines.append(f"| {name} | {f['int8']['top1_agreement']:.3f} | {f['int8']['max_rel_error']:.4f} | "
                         f"{f['int4']['top1_agreement']:.3f} | {f['int4']['max_rel_error']:.4f} |")
    if "presets" in presets:
        lines += ["", "| released LLM | bf16 GB | int8 GB (ratio) | int4 GB (ratio) |", "|---|---|---|---|"]
        for name, b in presets["presets"].items():
            lines.append(f"| {name} | {_gb(b['none'])} | {_gb(b['int8'])} ({b['int8'] / b['none']:.3f}x) | "
                         f"{_gb(b['int4'])} ({b['int4'] / b['none']:.3f}x) |")
    print("\n".join(["", *lines]))
    write_results({"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": rows,
                   "families": families.get("families", families), "presets": presets.get("presets", presets),
                   "table": lines}, args.out, optional=("jax", "jaxlib"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
