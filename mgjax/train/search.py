"""`mgjax plan CONFIG.yaml --topology SLICE --search`: a handful of variants of a training run compiled with the
TPU compiler for a slice (`mgjax.train.aot.dry_run`), and the one that fits with the shortest roofline step.

Variants: micro_batch (per host) at half, the same and twice the config's; remat dots or full; the slice split
fsdp-only or with a tensor axis of 2; loss_chunk as configured or off. Those the analytic planner
(`mgjax.plan`) puts far over the chip's HBM are not compiled; the rest are ranked by how much work each
step saves (bigger micro-batches first, then less recomputation) and the first `limit` compiled.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from mgjax.errors import MGJaxError
from mgjax.topology import Slice, hbm_bytes
from mgjax.train.aot import dry_run, mfu
from mgjax.train.config import TrainConfig, load_train_config

_REMAT_COST = {"none": 0, "dots": 1, "full": 2}


def variants(cfg: TrainConfig, topology: Slice) -> list[dict[str, object]]:
    """Override dicts (dotted keys -> values) for the variants of `cfg` that split over the slice."""
    chips, hosts = topology.chips, topology.hosts
    out = []
    for mb, remat, tensor, chunk in itertools.product(
            sorted({max(1, cfg.micro_batch // 2), cfg.micro_batch, cfg.micro_batch * 2}, reverse=True),
            ("dots", "full"), (1, 2), sorted({cfg.model.loss_chunk, 0}, reverse=True)):
        rows = mb * hosts
        if cfg.global_batch % rows or rows % (chips // tensor) or chips % tensor:
            continue
        out.append({"micro_batch": mb, "model.remat": remat, "mesh.data": 1, "mesh.fsdp": chips // tensor,
                    "mesh.tensor": tensor, "mesh.expert": 1, "model.loss_chunk": chunk})
    return out


def _planned_bytes(cfg: TrainConfig, v: dict, topology: Slice) -> float:
    """The analytic planner's bytes per chip for variant `v` (parameters, optimizer, activations estimated)."""
    from mgjax.config import MeshConfig
    from mgjax.plan import Job, plan
    from mgjax.presets import preset
    from mgjax.sharding import rules_for

    config = preset(cfg.model.preset) if cfg.model.preset and cfg.model.preset != "demo" else None
    if config is None:
        return 0.0  # a demo or a released folder: nothing to plan from without reading it
    mesh = MeshConfig(v["mesh.data"], v["mesh.fsdp"], v["mesh.tensor"], v["mesh.expert"])
    rows = v["micro_batch"] * topology.hosts
    job = Job(global_batch=cfg.global_batch, seq_len=config.max_length, grad_accum=cfg.global_batch // rows,
              remat=v["model.remat"])
    return plan(config, mesh, topology.chips, job, rules_for(cfg.rules)).total


def _override(v: dict) -> str:
    return " ".join(f"{k}={v[k]}" for k in v)


def search(config_path: str | Path, overrides: list[str], topology: Slice, limit: int = 4, echo=print) -> dict:
    """Compiles up to `limit` variants of the run; returns {"tried": [(override line, figures)], "best": (line,
    figures) or None}. `echo` gets a line per compiled variant as it ends."""
    cfg = load_train_config(config_path, overrides)
    hbm = hbm_bytes(topology)
    ranked = sorted(variants(cfg, topology), key=lambda v: (-v["micro_batch"], _REMAT_COST[v["model.remat"]],
                                                            v["mesh.tensor"], -v["model.loss_chunk"]))
    # what the planner puts at twice the chip or more is not worth a compile
    ranked = [v for v in ranked if _planned_bytes(cfg, v, topology) < 2 * hbm] or ranked
    if not ranked:
        raise MGJaxError(f"no micro_batch / mesh variant of global_batch {cfg.global_batch} splits over "
                         f"{topology.chips} chips on {topology.hosts} host(s)")
    tried = []
    for v in ranked[:limit]:
        line = _override(v)
        run = load_train_config(config_path, [*overrides, *(f"{k}={x}" for k, x in v.items())])
        try:
            r = dry_run(run, topology)
        except MGJaxError as e:  # a mesh the model's dimensions do not split over
            r = {"fits": False, "error": str(e)}
        tried.append((line, r))
        echo(_describe(line, r, hbm))
    fitting = [(line, r) for line, r in tried if r.get("fits")]
    best = min(fitting, key=lambda t: t[1]["step_s"]) if fitting else None
    return {"tried": tried, "best": best}


def _describe(line: str, r: dict, hbm: float) -> str:
    if "error" in r:
        return f"  {line}: {r['error']}"
    need = f"{r['peak_bytes'] / 2**30:.1f}" if "peak_bytes" in r else "?"
    if not r["fits"]:
        return f"  {line}: does not fit (needs {need} of {hbm / 2**30:.1f} GB per chip)"
    return (f"  {line}: {need} of {hbm / 2**30:.1f} GB per chip, step about {r['step_s']:.3f} s "
            f"({r['bound']}-bound), MFU {mfu(r):.0%}, compiled in {r['compile_s']:.0f} s")


def summary(result: dict) -> str:
    if result["best"] is None:
        return "fits: no variant tried fits; try a larger slice or a smaller micro_batch"
    line, r = result["best"]
    return (f"best: step about {r['step_s']:.3f} s, MFU {mfu(r):.0%}, {r['peak_bytes'] / 2**30:.1f} GB per chip\n"
            f"overrides: {line}")

