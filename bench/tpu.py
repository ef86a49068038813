"""Benchmark: every released recipe compiled with the real TPU compiler (libtpu) for a Cloud TPU slice, on this
machine, with no TPU: `mgjax train configs/mgm/NAME/stage2.yaml --dry-run --topology SLICE` (stage 2 at the
paper's global batch 128, the configs' micro_batch per host) and `mgjax eval mmvet --ckpt NAME --dry-run
--topology SLICE --batch-size 32 --dtype bfloat16` (the paper's longest budget, 1024 new tokens). Each case in
its own process. Per case: fits, HBM per chip, compile time, the roofline step (or decode step) and MFU.

  python bench/tpu.py                       # every case below (2-core CPU: a few hours)
  python bench/tpu.py --only MGM-7B         # the cases of one release
  python bench/tpu.py --kind eval           # inference only

Rows are added to bench/results/tpu.json as each case ends (a case already there is skipped unless --redo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.children import ROOT, child, run_child  # noqa: E402

OUT = ROOT / "bench" / "results" / "tpu.json"
# stage 2 on a reference slice per size, the configs as released, then the variants that fit where they do not
TRAIN = [("MGM-7B", "v5p-64", []), ("MGM-34B-HD", "v5p-64", []), ("MGM-8x7B-HD", "v5p-64", []),
         ("MGM-34B-HD", "v5p-64", ["micro_batch=4"]), ("MGM-2B", "v5p-16", []), ("MGM-7B-HD", "v5p-64", []),
         ("MGM-8B", "v5p-64", []), ("MGM-8B-HD", "v5p-64", []), ("MGM-13B", "v5p-64", []),
         ("MGM-13B-HD", "v5p-64", []), ("MGM-34B", "v5p-64", []), ("MGM-8x7B", "v5p-64", []),
         # the largest two on half the slice: is v5p-64 the smallest that fits?
         ("MGM-8x7B-HD", "v5p-32", []), ("MGM-34B-HD", "v5p-32", ["micro_batch=4"])]
# batch-32 eval at the longest budget: (slice, mesh) tried in order until one fits; one host's chips (each
# host answers its own share). tensor=-1 (the weights stay put while decoding) leaves the towers' maps of all 32
# images on every chip: it fits no v5e slice even for MGM-2B (22 GB per chip; bench/results/tpu.json), so the
# ladder splits the batch (fsdp=-1: the weights are gathered every step).
LADDER = [("v5e-8", "fsdp=-1"), ("v6e-8", "fsdp=-1")]
EVAL = {"MGM-2B": [("v5e-1", "tensor=-1"), ("v5e-4", "tensor=-1"), ("v5e-8", "tensor=-1"), ("v5e-8", "fsdp=-1")],
        **{n: LADDER for n in ("MGM-7B", "MGM-7B-HD", "MGM-8B", "MGM-8B-HD", "MGM-13B", "MGM-13B-HD", "MGM-34B")},
        # MGM-34B needs 20.4 GB per v5e-8 chip (bench/results/tpu.json); these hold more weights or a longer
        # prompt, so their v5e-8 compile (~15 minutes here to read the compiler's out-of-memory) is skipped
        **{n: LADDER[1:] for n in ("MGM-34B-HD", "MGM-8x7B", "MGM-8x7B-HD")}}


def command(spec: dict) -> list[str]:
    if spec["kind"] == "train":
        return ["mgjax", "train", f"configs/mgm/{spec['name']}/stage2.yaml", *spec.get("overrides", []),
                "--dry-run", "--topology", spec["slice"]]
    return ["mgjax", "eval", "mmvet", "--ckpt", spec["name"], "--dry-run", "--topology", spec["slice"],
            "--batch-size", "32", "--dtype", "bfloat16", "--mesh", spec["mesh"]]


def child_train(spec: dict) -> dict:
    from mgjax.topology import compiler_platform_only, parse_slice

    compiler_platform_only()
    from mgjax.train.aot import dry_run, mfu
    from mgjax.train.config import load_train_config

    cfg = load_train_config(ROOT / "configs" / "mgm" / spec["name"] / "stage2.yaml", spec.get("overrides", []))
    r = dry_run(cfg, parse_slice(spec["slice"]), spec.get("hlo_file"))
    return {**r, "mfu": mfu(r)}


def child_eval(spec: dict) -> dict:
    from mgjax.topology import compiler_platform_only, parse_slice

    compiler_platform_only()
    from mgjax.eval.benchmarks import BENCHES
    from mgjax.infer.aot import Workload, dry_run
    from mgjax.presets import preset

    work = Workload(32, BENCHES["mmvet"].max_new_tokens, 512, "bfloat16")
    return dry_run(preset(spec["name"]), parse_slice(spec["slice"]), work, spec["mesh"])


def _row(spec: dict, r: dict) -> str:
    if "error" in r:
        return (f"{spec['kind']:<6}{spec['name']:<13}{spec['slice']:<9}{spec.get('mesh', ''):<11}"
                f"error: {r['error'][:100]}")
    x = r if spec["kind"] == "train" else max((r["prompt"], r["decode"]), key=lambda p: p.get("peak_bytes", 0))
    peak = f"{x['peak_bytes'] / 2**30:.1f}" if "peak_bytes" in x else "-"
    compile_s = r["compile_s"] if spec["kind"] == "train" else r["prompt"]["compile_s"] + r["decode"]["compile_s"]
    step = r.get("step_s") if spec["kind"] == "train" else r["decode"].get("step_s")
    mfu = f"{r['mfu']:.0%}" if spec["kind"] == "train" and r.get("mfu") else "-"
    return (f"{spec['kind']:<6}{spec['name']:<13}{spec['slice']:<9}{spec.get('mesh', ''):<11}"
            f"{'yes' if r['fits'] else 'no':<5}"
            f"{peak:>7} / {x['hbm_bytes'] / 2**30:.1f}{compile_s:>10.0f}"
            f"{(f'{step:.3f}' if step else '-'):>10}{mfu:>6}")


def markdown(results: dict) -> str:
    """The README's tables from the results: training (MFU from `mgjax.plan.model_flops`, so rows written before
    a change of that count read the same), then inference."""
    from mgjax.plan import model_flops
    from mgjax.presets import preset
    from mgjax.topology import CHIPS

    train = ["| release | slice | fits | HBM per chip (GB) | compile s | roofline step s (bound) | MFU | command |",
             "|---|---|---|---|---|---|---|---|"]
    infer = ["| release | slice, mesh | fits | HBM per chip (GB) | weights + KV cache per chip (GB) | "
             "compile s | decode step ms (bound) | command |", "|---|---|---|---|---|---|---|---|"]
    releases = list(EVAL)
    for row in sorted(results["rows"], key=lambda row: (releases.index(row["spec"]["name"]),
                                                       row["spec"].get("overrides", []))):
        spec, r = row["spec"], row["result"]
        if "error" in r:
            continue
        cmd = f"`{row['command']}`"
        hbm = r.get("hbm_bytes", r.get("prompt", {}).get("hbm_bytes", 0)) / 2**30
        if spec["kind"] == "train":
            rows = r["rows"] * r["micro_batches"]
            flops = model_flops(preset(spec["name"]), rows, r["merged_len"], rows)
            mfu = flops / (r["devices"] * CHIPS[r["chip"]].peak_flops * r["step_s"]) if r.get("step_s") else None
            peak = f"{r['peak_bytes'] / 2**30:.1f} of {hbm:.1f}" if "peak_bytes" in r else f"over {hbm:.1f}"
            step = f"{r['step_s']:.2f} ({r['bound']})" if r.get("step_s") else "-"
            name = " ".join([spec["name"], *spec.get("overrides", [])])
            train.append(f"| {name} | {spec['slice']} | {'yes' if r['fits'] else 'no'} | {peak} | "
                         f"{r['compile_s']:.0f} | {step} | {f'{mfu:.0%}' if mfu else '-'} | {cmd} |")
        else:
            worst = max((r["prompt"], r["decode"]), key=lambda x: x.get("peak_bytes", 0))
            peak = f"{worst['peak_bytes'] / 2**30:.1f} of {hbm:.1f}" if "peak_bytes" in worst else f"over {hbm:.1f}"
            decode = f"{r['decode']['step_s'] * 1e3:.0f} ({r['decode']['bound']})" if r["decode"].get("step_s") \
                else "-"
            infer.append(f"| {spec['name']} | {spec['slice']}, {spec['mesh']} | {'yes' if r['fits'] else 'no'} | "
                         f"{peak} | {(r['weights_bytes'] + r['cache_bytes']) / 2**30:.1f} | "
                         f"{r['prompt']['compile_s'] + r['decode']['compile_s']:.0f} | {decode} | {cmd} |")
    return "\n".join(train) + "\n\n" + "\n".join(infer)


def _hlo_name(spec: dict) -> str:
    return "-".join([spec["kind"], spec["name"], spec["slice"], *spec.get("overrides", [])]) + ".hlo"


def rederive(results: dict, out: Path, hlo_dir: Path) -> int:
    from mgjax.roofline import hlo_cost, step_time
    from mgjax.topology import CHIPS

    for row in results["rows"]:
        spec, r = row["spec"], row["result"]
        hlo = hlo_dir / _hlo_name(spec)
        if spec["kind"] != "train" or not hlo.is_file() or "step_s" not in r:
            continue
        cost, chip = hlo_cost(hlo.read_text()), CHIPS[r["chip"]]
        r.update(step_flops=cost.flops, step_hbm_bytes=cost.bytes, step_collective_bytes=cost.collective_bytes,
                 **step_time(cost, chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth))
        print(f"{spec['name']} {spec['slice']}: step {r['step_s']:.3f} s ({r['bound']})")
    out.write_text(json.dumps(results, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["train", "eval", "all"], default="all")
    ap.add_argument("--only", action="append", help="only this release (repeat for several)")
    ap.add_argument("--redo", action="store_true", help="compile cases already in the results again")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--hlo-dir", help="write each training step's compiled HLO text here")
    ap.add_argument("--markdown", action="store_true", help="only print the README's tables from the results")
    ap.add_argument("--rederive", action="store_true", help="recompute the training rows' roofline from the HLO "
                    "files in --hlo-dir (after a change to mgjax.roofline), without compiling")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    if args.markdown:
        print(markdown(results))
        return 0
    if args.rederive:
        return rederive(results, out, Path(args.hlo_dir or "."))
    specs = [[{"kind": "eval", "name": n, "slice": s, "mesh": m} for s, m in tries] for n, tries in EVAL.items()] + \
            [[{"kind": "train", "name": n, "slice": s, **({"overrides": o} if o else {})}] for n, s, o in TRAIN]
    specs = [s for s in specs if args.kind in ("all", s[0]["kind"]) and (not args.only or s[0]["name"] in args.only)]
    print(f"{'kind':<6}{'release':<13}{'slice':<9}{'mesh':<11}{'fits':<5}{'GB/chip of HBM':>15}{'compile s':>10}"
          f"{'step s':>10}{'MFU':>6}")
    for tries in specs:  # a release's (slice, mesh) tries, until one fits
        for spec in tries:
            done = [r for r in results["rows"] if r["spec"] == spec]
            if done and not args.redo:
                r = done[0]["result"]
            else:
                train = args.hlo_dir and spec["kind"] == "train"
                hlo = {"hlo_file": str(Path(args.hlo_dir) / _hlo_name(spec))} if train else {}
                r = run_child(__file__, spec["kind"], {**spec, **hlo}, dict(os.environ), ("name", "slice"))
                if out.is_file():  # read again: another run (--kind train beside --kind eval) may have added rows
                    results = json.loads(out.read_text())
                results["rows"] = [x for x in results["rows"] if x["spec"] != spec] + \
                    [{"spec": spec, "command": " ".join(command(spec)), "result": r}]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1, default=str))
            print(_row(spec, r), flush=True)
            if r.get("fits"):
                break
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child({"train": child_train, "eval": child_eval}, *sys.argv[2:5])
    else:
        sys.exit(main())
