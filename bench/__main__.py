"""Every benchmark with one command: `python -m bench` (or `make bench`) from the repository root.

Runs bench/cpu.py on a CPU (mgjax beside HF PyTorch modules of the same shapes: encode, prompt pass,
decode, train step and peak RSS as speed ratios measured in one run, with the CPU's model and flags; the
per-part forward + backward table), bench/train.py (the training step per config and remat policy, the
machine's measured matmul ceiling and each case's MFU against it, HF PyTorch's Llama step beside the
LLM-only step) and bench/generate.py (generation per batch size next to HF's `generate`; mgjax's encode and
prefill timed apart with their MFU against train's ceiling when that is float32), each case in its own
process as those scripts do, then prints one summary table and writes bench/results/summary.json (the
scripts' own JSON files stay beside it).

  python -m bench            # tiny and 100m configs (2-core CPU: about 50 minutes)
  python -m bench --quick    # the tiny config only, bench/cpu.py's batch-1 rows (2-core CPU: about 10 minutes)
  python -m bench --no-torch # without the PyTorch reference rows (and without bench/cpu.py)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _suites(quick: bool, torch: bool) -> list[tuple[str, list[str]]]:
    configs = ["--configs", "tiny"] if quick else []
    torch_flag = [] if torch else ["--no-torch"]
    side_by_side = []
    if torch and _on_cpu():
        rows = ["--rows", "encode 1,prompt 1,decode 1"] if quick else ["--parts"]
        side_by_side = [("cpu", [*rows, "--out", str(RESULTS / "cpu.json")])]
    # generate reuses train's matmul ceiling when it is float32 (a CPU), else measures its own float32 one
    return side_by_side + [("train", [*configs, *torch_flag, "--out", str(RESULTS / "train.json")]),
            ("generate", [*configs, *torch_flag, "--ceiling", str(RESULTS / "train.json"),
                          "--out", str(RESULTS / "generate.json")])]


def _on_cpu() -> bool:
    """Whether JAX's default backend here is the CPU (asked in a child, so that this process holds no device)."""
    probe = "import jax; print(jax.default_backend())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1:] == ["cpu"]


def _gb(row: dict) -> str:
    """Peak memory: the device's peak on an accelerator, else the case process's peak RSS."""
    peak = (row.get("peak_memory") or {}).get("bytes") or row.get("ru_maxrss_bytes")
    return f"{peak / 1e9:.2f}" if peak else "-"


def _num(x, spec: str, scale: float = 1.0, unit: str = "") -> str:
    """x scaled and formatted, or "-" where the row lacks it (torch rows, a failed measurement)."""
    return "-" if x is None else format(x * scale, spec) + unit


def summary(train: dict, generate: dict) -> tuple[list[str], dict]:
    """Table lines and the summary's JSON from the two scripts' results."""
    ceiling = train.get("matmul_ceiling", {}).get("flops_per_s")
    lines = [f"matmul ceiling {ceiling / 1e12:.3f} TFLOP/s ({train['device']['device_kind']})" if ceiling else
             "matmul ceiling: not measured",
             "", "| train step | config | remat | step s | tokens/s | MFU | compile s | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in train.get("rows", []):
        if "error" in r:
            lines.append(f"| {r.get('kind', '-')} | {r.get('config')} | {r.get('remat')} | failed: {r['error']} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        lines.append(f"| {r.get('kind', '-')} | {r['config']} | {r.get('remat', '-')} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {mfu} | {compile_s} | {_gb(r)} |")
    # encode / prefill pass: mgjax's two prefill programs timed alone (MFU vs generate's float32 ceiling)
    lines += ["", "| generate | config | B | questions/s | decode tokens/s | prefill s | compile s | peak GB | "
              "encode s | encode MFU | prefill pass s | prefill pass MFU | decode of bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in generate.get("rows", []):
        if "error" in r:
            lines.append(f"| {r.get('framework')} | {r.get('config')} | {r.get('batch')} | failed: {r['error']} |")
            continue
        fw = "mgjax" if r["framework"] == "jax" else "HF PyTorch"
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        lines.append(f"| {fw} | {r['config']} | {r['batch']} | {r['questions_per_s']:.3f} | "
                     f"{_num(r.get('decode_tokens_per_s'), '.1f')} | {r['prefill_s']:.2f} | {compile_s} | {_gb(r)} | "
                     f"{_num(r.get('encode_s'), '.4f')} | {_num(r.get('encode_mfu'), '.1f', 100, '%')} | "
                     f"{_num(r.get('prefill_pass_s'), '.4f')} | {_num(r.get('prefill_pass_mfu'), '.1f', 100, '%')} | "
                     f"{_num(r.get('decode_bandwidth_util'), '.1f', 100, '%')} |")
    return lines, {"matmul_ceiling_flops_per_s": ceiling, "train": train.get("rows", []),
                   "generate_matmul_ceiling_flops_per_s": (generate.get("matmul_ceiling") or {}).get("flops_per_s"),
                   "generate_copy_bytes_per_s": (generate.get("copy_bandwidth") or {}).get("bytes_per_s"),
                   "generate": generate.get("rows", []), "generate_targets": generate.get("targets")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny config only")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="the HF transformers PyTorch reference rows")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    suites = _suites(args.quick, args.torch)
    for name, flags in suites:
        print(f"== bench/{name}.py {' '.join(flags)}", flush=True)
        code = subprocess.call([sys.executable, str(ROOT / "bench" / f"{name}.py"), *flags], cwd=ROOT)
        if code:
            print(f"bench/{name}.py failed (exit {code})", file=sys.stderr)
            return code
    results = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in ("train", "generate")}
    lines, data = summary(results["train"], results["generate"])
    if "cpu" in dict(suites):
        data["cpu"] = json.loads((RESULTS / "cpu.json").read_text())
        lines = [*data["cpu"]["table"], "", *lines]
    data.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv, quick=args.quick,
                wall_s=time.time() - t0, device=results["train"].get("device"), host=results["train"].get("host"))
    (RESULTS / "summary.json").write_text(json.dumps(data, indent=1))
    print("\n".join(["", *lines, "", f"written: {RESULTS / 'summary.json'} (and train.json, generate.json)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
