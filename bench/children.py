"""What the benchmarks share: each case runs in a fresh interpreter (`python SCRIPT _child KIND SPEC OUT`),
so that its peak memory is its own and a device is never held twice."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__}


def timed(fn: Callable[[], object], calls: int) -> list[float]:
    """Wall seconds of `calls` calls of `fn` (which must finish its work before returning)."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def child(kinds: dict[str, Callable[[dict], dict]], kind: str, spec_file: str, out_file: str) -> None:
    """In the child: the row of `kinds[kind](spec)` plus the process's peak RSS, written to `out_file`."""
    row = kinds[kind](json.loads(Path(spec_file).read_text()))
    row["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out_file).write_text(json.dumps(row))


def run_child(script: str, kind: str, spec: dict, env: dict, error_keys: tuple[str, ...]) -> dict:
    """Runs case `kind` of `script` with `spec` in a fresh interpreter: its row plus wall time and the load
    average before it started; on failure {"error": the last line of stderr, and `error_keys` of spec}."""
    with tempfile.TemporaryDirectory(prefix="mgjax-bench-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(script).resolve()), "_child", kind, str(spec_file), str(out_file)]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out_file.is_file():
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1],
                    **{k: spec.get(k) for k in error_keys}}
        row = json.loads(out_file.read_text())
    row["child_wall_s"] = time.perf_counter() - t0
    row["loadavg_1min_before"] = load
    return row


def write_results(result: dict, path: str | os.PathLike, optional: tuple[str, ...] = ()) -> Path:
    """A benchmark's JSON, with the versions of the `optional` packages that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    for package in optional:
        try:
            result.setdefault("versions", {})[package] = version(package)
        except PackageNotFoundError:
            pass
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return out
