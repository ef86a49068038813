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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.children import ROOT, child, run_child  # noqa: E402

OUT = ROOT / "bench" / "results" / "tpu.json"
# stage 2 on a reference slice per size; HD 34B and 8x7B on the smallest v5p slice found to fit
TRAIN = [("MGM-7B", "v5p-64"), ("MGM-34B-HD", "v5p-64"), ("MGM-8x7B-HD", "v5p-64"), ("MGM-2B", "v5p-16"),
         ("MGM-7B-HD", "v5p-64"), ("MGM-8B", "v5p-64"), ("MGM-8B-HD", "v5p-64"), ("MGM-13B", "v5p-64"),
         ("MGM-13B-HD", "v5p-64"), ("MGM-34B", "v5p-64"), ("MGM-8x7B", "v5p-64")]
# batch-32 eval at the longest budget on the smallest v5e slice that holds it
EVAL = [("MGM-2B", "v5e-1"), ("MGM-7B", "v5e-4"), ("MGM-7B-HD", "v5e-4"), ("MGM-8B", "v5e-4"),
        ("MGM-8B-HD", "v5e-4"), ("MGM-13B", "v5e-4"), ("MGM-13B-HD", "v5e-8"), ("MGM-34B", "v5e-8"),
        ("MGM-34B-HD", "v5e-8"), ("MGM-8x7B", "v5e-8"), ("MGM-8x7B-HD", "v5e-8")]


def command(spec: dict) -> list[str]:
    if spec["kind"] == "train":
        return ["mgjax", "train", f"configs/mgm/{spec['name']}/stage2.yaml", *spec.get("overrides", []),
                "--dry-run", "--topology", spec["slice"]]
    return ["mgjax", "eval", "mmvet", "--ckpt", spec["name"], "--dry-run", "--topology", spec["slice"],
            "--batch-size", "32", "--dtype", "bfloat16"]


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
    return dry_run(preset(spec["name"]), parse_slice(spec["slice"]), work)


def _row(spec: dict, r: dict) -> str:
    if "error" in r:
        return f"{spec['kind']:<6}{spec['name']:<13}{spec['slice']:<9}error: {r['error'][:80]}"
    x = r if spec["kind"] == "train" else max((r["prompt"], r["decode"]), key=lambda p: p.get("peak_bytes", 0))
    peak = f"{x['peak_bytes'] / 2**30:.1f}" if "peak_bytes" in x else "-"
    compile_s = r["compile_s"] if spec["kind"] == "train" else r["prompt"]["compile_s"] + r["decode"]["compile_s"]
    step = r.get("step_s") if spec["kind"] == "train" else r["decode"].get("step_s")
    mfu = f"{r['mfu']:.0%}" if spec["kind"] == "train" and r.get("mfu") else "-"
    return (f"{spec['kind']:<6}{spec['name']:<13}{spec['slice']:<9}{'yes' if r['fits'] else 'no':<5}"
            f"{peak:>7} / {x['hbm_bytes'] / 2**30:.1f}{compile_s:>10.0f}"
            f"{(f'{step:.3f}' if step else '-'):>10}{mfu:>6}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["train", "eval", "all"], default="all")
    ap.add_argument("--only", action="append", help="only this release (repeat for several)")
    ap.add_argument("--redo", action="store_true", help="compile cases already in the results again")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--hlo-dir", help="write each training step's compiled HLO text here")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    specs = [{"kind": "eval", "name": n, "slice": s} for n, s in EVAL] + \
            [{"kind": "train", "name": n, "slice": s} for n, s in TRAIN]
    specs = [s for s in specs if args.kind in ("all", s["kind"]) and (not args.only or s["name"] in args.only)]
    print(f"{'kind':<6}{'release':<13}{'slice':<9}{'fits':<5}{'GB/chip of HBM':>15}{'compile s':>10}"
          f"{'step s':>10}{'MFU':>6}")
    for spec in specs:
        done = [r for r in results["rows"] if r["spec"] == spec]
        if done and not args.redo:
            print(_row(spec, done[0]["result"]))
            continue
        import os

        hlo = {"hlo_file": str(Path(args.hlo_dir) / f"{spec['kind']}-{spec['name']}-{spec['slice']}.hlo")} \
            if args.hlo_dir and spec["kind"] == "train" else {}
        r = run_child(__file__, spec["kind"], {**spec, **hlo}, dict(os.environ), ("name", "slice"))
        results["rows"] = [x for x in results["rows"] if x["spec"] != spec] + \
            [{"spec": spec, "command": " ".join(command(spec)), "result": r}]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
        print(_row(spec, r), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child({"train": child_train, "eval": child_eval}, *sys.argv[2:5])
    else:
        sys.exit(main())
