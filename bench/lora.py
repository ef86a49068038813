"""The demo's stage 2 trained three ways at equal steps, from the same stage-1 run: full tuning
(configs/demo/stage2.yaml), LoRA (configs/demo/stage2_lora.yaml) and QLoRA (the same on an int8 LLM), each
then asked the 256 held-out questions. Per run: held-out accuracy, trainable parameters, the last step
checkpoint's size (array bytes and the whole step folder, Orbax's metadata included), the frozen folder and
the median step time. Prints a table, writes bench/results/lora.json.

    python bench/lora.py [--work DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = {"full": ("stage2.yaml", []), "lora": ("stage2_lora.yaml", []),
        "qlora int8": ("stage2_lora.yaml", ["model.quantize=int8"])}


def _mgjax(*args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run([sys.executable, "-m", "mgjax", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"mgjax {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _array_bytes(step: Path) -> int:
    """The step's array data: the files under state/ holding tensors (ocdbt data files), not its metadata."""
    return sum(p.stat().st_size for p in (step / "state").rglob("*") if p.is_file() and "ocdbt.process" in str(p)
               and p.parent.name == "d")


def _trainable(run: Path) -> int:
    from mgjax.train.config import load_train_config
    from mgjax.train.loop import run_setup

    import jax

    setup = run_setup(load_train_config(run / "train_config.yaml"), run)
    return sum(int(a.size) for a in jax.tree.leaves(setup.a_state.params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_lora"))
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    work = Path(args.work)
    stage1 = work / "stage1"
    if not (stage1 / "checkpoints").is_dir():
        _mgjax("train", "configs/demo/stage1.yaml", f"run_dir={stage1}")
    rows = {}
    for name, (config, extra) in RUNS.items():
        run = work / name.replace(" ", "_")
        _mgjax("train", f"configs/demo/{config}", f"run_dir={run}", f"model.stage1={stage1}", f"steps={args.steps}",
               *extra)
        out = _mgjax("eval", "shapes", "--ckpt", str(run))
        step = max((run / "checkpoints").iterdir(), key=lambda p: int(p.name))
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[name] = {"held_out_accuracy": float(re.search(r"held-out accuracy ([\d.]+)%", out).group(1)) / 100,
                      "trainable_params": _trainable(run), "step_folder_bytes": _folder_bytes(step),
                      "step_array_bytes": _array_bytes(step), "frozen_bytes": _folder_bytes(run / "frozen"),
                      "median_step_s": statistics.median(r["step_s"] for r in metrics if "step_s" in r),
                      "final_loss": metrics[-1]["loss"]}
    full = rows["full"]
    print(f"{'run':<11} {'held-out':>8} {'trainable':>10} {'of full':>7} {'step ckpt KB':>12} {'of full':>7} "
          f"{'arrays KB':>9} {'of full':>7} {'frozen KB':>9} {'step s':>6}")
    for name, r in rows.items():
        print(f"{name:<11} {r['held_out_accuracy']:>8.1%} {r['trainable_params']:>10} "
              f"{r['trainable_params'] / full['trainable_params']:>7.1%} {r['step_folder_bytes'] / 1024:>12.0f} "
              f"{r['step_folder_bytes'] / full['step_folder_bytes']:>7.1%} {r['step_array_bytes'] / 1024:>9.0f} "
              f"{r['step_array_bytes'] / full['step_array_bytes']:>7.1%} {r['frozen_bytes'] / 1024:>9.0f} "
              f"{r['median_step_s']:>6.3f}")
    out = ROOT / "bench" / "results" / "lora.json"
    out.write_text(json.dumps({"steps": args.steps, "runs": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
