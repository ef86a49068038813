"""Benchmark: wall time and peak host memory of `mgjax convert` on a full-size synthetic checkpoint.

Writes a synthetic checkpoint shaped exactly like a released MGM model (default MGM-7B: Vicuna-7B +
CLIP ViT-L/14-336 + ConvNeXt-L, ~15 GB of random bf16 in ~5 GB indexed safetensors shards, with the
released tensor names, including the tensors mgjax ignores: CLIP's last encoder layer and its
post-LayerNorm), then runs `python -m mgjax convert SRC OUT --dtype bfloat16 --towers-from-checkpoint`
in a child process (per-layer layout, then `--scan-layers` unless `--skip-scan`) and reports, per layout:

  wall s          child's wall time (interpreter start and imports included)
  peak RSS GB     the child's ru_maxrss (os.wait4), which counts file-backed pages it has mapped
  peak anon GB    the highest RssAnon seen by a 50 ms /proc sampler (heap; what cannot be reclaimed)
  peak file GB    the highest RssFile seen by the sampler (memory-mapped checkpoint pages)
  output GB       bytes under OUT;  GB/s = source checkpoint bytes / wall s

Results go to bench/results/convert_memory.json (and a table on stdout). The synthetic checkpoint and
the outputs are deleted at the end unless --keep. `--trace` runs the child through a wrapper that
records RssAnon / RssFile / VmHWM around every parameter group (`mgjax.convert.mgjax_ckpt._groups`) and
stores the per-group records in the JSON (the wrapper only reads /proc; it does not change mgjax).

  python bench/convert_memory.py --shape MGM-2B          # ~6 GB smoke run
  python bench/convert_memory.py                         # MGM-7B, both layouts (~15 GB in, ~15 GB out each)
  python bench/convert_memory.py --workdir /tmp/mgm7b --keep ...   then   --workdir /tmp/mgm7b --reuse

Sizes are GB = 1e9 bytes. Needs ~2x the checkpoint size of free disk under --workdir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from children import write_results  # bench/, the script's folder, is on sys.path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "convert_memory.json"
COMPLETE = ".synthetic_complete.json"
GB = 1e9

# Released tower folders as the MGM config.json files name them (relative to the working directory).
CLIP_TOWER = "model_zoo/OpenAI/clip-vit-large-patch14-336"
CONVNEXT_TOWER = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"


# --- synthetic checkpoint ------------------------------------------------------------------------

def released_config(config) -> dict:
    """A released-style MGM config.json for `config` (an MGMConfig preset), LLM fields from its LMConfig."""
    lm = config.lm
    # MGM-2B's config.json (transformers 4.3x) says hidden_act "gelu", which mgjax reads as exact GELU.
    act = {"hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(lm.activation, lm.activation)}
    if lm.family == "gemma":
        model_type, arch = "mgm_gemma", "MGMGemmaForCausalLM"
        tokens = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    elif lm.family == "mixtral":
        model_type, arch = "mgm_mixtral", "MGMMixtralForCausalLM"
        tokens = {"bos_token_id": 1, "eos_token_id": 2}
    else:
        model_type, arch = "mgm", "MGMLlamaForCausalLM"
        tokens = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    d = {
        "_name_or_path": "synthetic", "architectures": [arch], "model_type": model_type,
        "attention_bias": False, "attention_dropout": 0.0, **tokens, **act,
        "head_dim": lm.head_dim, "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
        "initializer_range": 0.02, "max_position_embeddings": lm.max_position_embeddings,
        "num_attention_heads": lm.num_heads, "num_hidden_layers": lm.num_layers,
        "num_key_value_heads": lm.num_kv_heads, "rms_norm_eps": lm.norm_eps, "rope_scaling": None,
        "rope_theta": lm.rope_theta, "tie_word_embeddings": lm.tie_word_embeddings, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2", "use_cache": True, "vocab_size": lm.vocab_size,
        # MGM keys
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": config.image_aspect_ratio,
        "image_global": config.image_global, "image_grid": config.image_grid, "image_grid_pinpoints": None,
        "image_size_aux": config.image_size_aux, "mm_hidden_size": config.mm_hidden_size,
        "mm_hidden_size_aux": config.mm_hidden_size_aux, "mm_projector_lr": None,
        "mm_projector_type": config.projector_type, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": config.select_feature,
        "mm_vision_select_layer": config.select_layer, "mm_vision_tower": CLIP_TOWER,
        "mm_vision_tower_aux": CONVNEXT_TOWER, "optimize_vision_tower": False,
        "optimize_vision_tower_aux": False, "tokenizer_model_max_length": config.max_length,
        "tokenizer_padding_side": config.padding_side, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }
    if lm.family == "llama":
        d["pretraining_tp"] = 1
    if lm.family == "mixtral":
        d["num_local_experts"] = lm.num_experts
        d["num_experts_per_tok"] = lm.num_experts_per_tok
    return d


def tensor_list(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the released checkpoint, in HF state-dict order: the LLM
    (embeddings, layers, norm), the towers, mining and projector, then lm_head. Includes the tensors
    mgjax ignores (CLIP layers past the selected one, CLIP's post-LayerNorm)."""
    from mgjax.convert.names import CLIP_PREFIX, param_specs
    from mgjax.model import MGM, abstract_params

    shapes = abstract_params(MGM(config))
    llm, rest, head = [], [], []

    for s in param_specs(shapes, config):
        entries = [(k, tuple(s.torch_shape())) for k in s.torch_keys]
        (head if s.path[:2] == ("llm", "lm_head") else llm if s.path[0] == "llm" else rest).extend(entries)

    # The released checkpoints carry CLIP's whole encoder and its post-LayerNorm.
    used = config.clip_layers_used
    last = f"{CLIP_PREFIX}encoder.layers.{used - 1}."
    template = [(k[len(last):], shp) for k, shp in rest if k.startswith(last)]
    extra = [(f"{CLIP_PREFIX}encoder.layers.{i}.{k}", shp)
             for i in range(used, config.vision.num_layers) for k, shp in template]
    extra += [(f"{CLIP_PREFIX}post_layernorm.weight", (config.vision.hidden_size,)),
              (f"{CLIP_PREFIX}post_layernorm.bias", (config.vision.hidden_size,))]
    # After the last CLIP tensor.
    at = max(i for i, (k, _) in enumerate(rest) if k.startswith(CLIP_PREFIX)) + 1
    rest = rest[:at] + extra + rest[at:]

    def llm_order(item):
        k = item[0]
        if k.startswith("model.embed_tokens."):
            return (0, 0)
        if k.startswith("model.layers."):
            return (1, int(k.split(".")[2]))
        return (2, 0)

    llm.sort(key=llm_order)  # stable: keeps the in-layer order
    return llm + rest + head


def shard_plan(tensors, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """HF `shard_checkpoint`-style split: a new shard when the next tensor would pass the limit."""
    shards, size = [[]], 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _write_shard(path: Path, entries, rng, chunk: int) -> int:
    """Streams one bf16 safetensors file: header, then each tensor generated in chunks."""
    import ml_dtypes
    import numpy as np

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shape in entries:
            left = math.prod(shape)
            while left:
                n = min(left, chunk)
                x = rng.standard_normal(n, dtype=np.float32)
                x *= 0.02  # finite normal values: no NaN/Inf bit patterns
                f.write(x.astype(ml_dtypes.bfloat16).view(np.uint16).data)
                left -= n
    tmp.rename(path)
    return offset


def write_checkpoint(folder: Path, config, max_shard_bytes: int, seed: int) -> dict:
    import numpy as np

    tensors = tensor_list(config)
    shards = shard_plan(tensors, max_shard_bytes)
    total = sum(math.prod(s) * 2 for _, s in tensors)
    free = shutil.disk_usage(folder).free
    if free < total * 1.05:
        sys.exit(f"{folder}: {free / GB:.1f} GB free, the synthetic checkpoint needs {total / GB:.1f} GB")
    (folder / "config.json").write_text(json.dumps(released_config(config), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2))
    rng = np.random.default_rng(seed)
    weight_map, t0 = {}, time.time()
    for i, entries in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        t = time.time()
        n = _write_shard(folder / name, entries, rng, chunk=1 << 23)
        weight_map.update({k: name for k, _ in entries})
        print(f"  wrote {name}: {len(entries)} tensors, {n / GB:.2f} GB in {time.time() - t:.0f} s", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    info = {"total_bytes": total, "tensors": len(tensors), "shards": len(shards),
            "files": {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": os.path.getsize(
                folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors") for i in range(len(shards))},
            "generate_s": round(time.time() - t0, 1)}
    (folder / COMPLETE).write_text(json.dumps(info, indent=1))
    return info


def complete_checkpoint(folder: Path, config, max_shard_bytes: int) -> dict | None:
    """The marker of a finished synthetic checkpoint of this shape, if its files are all there."""
    marker = folder / COMPLETE
    if not marker.is_file() or not (folder / "model.safetensors.index.json").is_file():
        return None
    info = json.loads(marker.read_text())
    tensors = tensor_list(config)
    if info.get("total_bytes") != sum(math.prod(s) * 2 for _, s in tensors) or \
            info.get("shards") != len(shard_plan(tensors, max_shard_bytes)):
        return None
    if any(not (folder / f).is_file() or os.path.getsize(folder / f) != n for f, n in info["files"].items()):
        return None
    if json.loads((folder / "config.json").read_text()) != released_config(config):
        return None
    return info


# --- measurement ---------------------------------------------------------------------------------

def _status(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM of `pid` in bytes (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            out = {}
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
            return out
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


class Sampler(threading.Thread):
    """Polls /proc/PID/status every `period` s, keeping the peaks and a coarse time series."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak: dict[str, int] = {}
        self.series: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self):
        t0, last = time.time(), -1.0
        while not self.stop.is_set():
            s = _status(self.pid)
            if s:
                for k, v in s.items():
                    self.peak[k] = max(self.peak.get(k, 0), v)
                now = time.time() - t0
                if now - last >= 1.0:  # one point a second for the JSON
                    self.series.append((round(now, 1), s.get("RssAnon", 0), s.get("RssFile", 0)))
                    last = now
            time.sleep(self.period)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_convert(src: Path, out: Path, scan: bool, dtype: str, trace: bool) -> dict:
    if trace:
        trace_file = out.parent / f"{out.name}.trace.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(src), str(out), dtype,
               "scan" if scan else "per-layer", str(trace_file)]
    else:
        trace_file = None
        # No tower folders here: the synthetic checkpoint's tower copies stand in for them.
        cmd = [sys.executable, "-m", "mgjax", "convert", str(src), str(out), "--dtype", dtype,
               "--towers-from-checkpoint"]
        if scan:
            cmd.append("--scan-layers")
    print("  $ " + " ".join(cmd), flush=True)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    load = os.getloadavg()[0]  # other work on the machine skews wall times (recorded in the JSON)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    log = proc.stdout.read()  # until the child closes it (exits)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    wall = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        print(log)
        raise SystemExit(f"convert failed with exit code {proc.returncode}")
    print("  " + log.strip().replace("\n", "\n  "), flush=True)
    traced = {}
    if trace_file is not None and trace_file.is_file():
        traced = json.loads(trace_file.read_text())
        trace_file.unlink()
    # ru_maxrss, unless the traced child reset its high-water mark (then its own record of the peak).
    peak = max(usage.ru_maxrss * 1024, traced.get("peak_hwm", 0), sampler.peak.get("VmRSS", 0))
    row = {
        "layout": "scan" if scan else "per-layer", "command": cmd,
        "wall_s": round(wall, 1), "loadavg_1min_before": round(load, 2),
        "peak_rss_gb": round(peak / GB, 3), "ru_maxrss_gb": round(usage.ru_maxrss * 1024 / GB, 3),
        "peak_anon_gb": round(sampler.peak.get("RssAnon", 0) / GB, 3),
        "peak_file_gb": round(sampler.peak.get("RssFile", 0) / GB, 3),
        "peak_rss_sampled_gb": round(sampler.peak.get("VmRSS", 0) / GB, 3),
        "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
        "major_faults": usage.ru_majflt, "output_gb": round(folder_bytes(out) / GB, 3),
        "rss_series_s_anon_file": sampler.series,
    }
    if trace:
        row["groups"] = traced.get("groups", [])
    return row


def child(src: str, out: str, dtype: str, layout: str, trace_file: str) -> None:
    """`_child`: mgjax's convert, recording RSS around every parameter group and the peak within
    each group (VmHWM)."""
    import mgjax.convert.mgjax_ckpt as conv

    records, groups = [], conv._groups
    clear = Path("/proc/self/clear_refs")

    top = {"hwm": 0}

    def reset_hwm():
        """Per-group peaks: VmHWM back to the current RSS. This also resets the ru_maxrss the parent
        reads, so the overall peak is kept here and reported in the trace file."""
        top["hwm"] = max(top["hwm"], (_status(os.getpid()) or {}).get("VmHWM", 0))
        try:
            clear.write_text("5")
        except OSError:
            pass

    def names(tree, prefix=""):
        for k, v in tree.items():
            p = f"{prefix}/{k}" if prefix else k
            yield from names(v, p) if isinstance(v, dict) else [(p, v)]

    def traced_named(*args, **kwargs):
        gen = groups(*args, **kwargs)
        t = time.time()
        reset_hwm()
        for group in gen:
            leaves = list(names(group))
            paths = [p for p, _ in leaves]
            nbytes = sum(int(getattr(v, "nbytes", 0)) for _, v in leaves)
            built = _status(os.getpid()) or {}
            tb = time.time()
            del leaves
            yield group
            del group
            saved = _status(os.getpid()) or {}
            common = os.path.commonprefix(paths).rstrip("/") if len(paths) > 1 else paths[0]
            records.append({"group": common or paths[0], "leaves": len(paths), "mb": round(nbytes / 1e6, 1),
                            "build_s": round(tb - t, 2), "save_s": round(time.time() - tb, 2),
                            "built": {k: round(v / 1e6) for k, v in built.items()},
                            "saved": {k: round(v / 1e6) for k, v in saved.items()}})
            reset_hwm()
            t = time.time()

    conv._groups = traced_named
    try:
        t = time.time()
        conv.convert(src, out, dtype=dtype, scan_layers=layout == "scan", towers_from_checkpoint=True)
        print(f"converted {src} -> {out} ({dtype}, {layout} layout, traced) in {time.time() - t:.1f} s")
    finally:
        reset_hwm()
        Path(trace_file).write_text(json.dumps({"groups": records, "peak_hwm": top["hwm"]}))


def verify(src: str, out: str, n: str = "16") -> None:
    """`_verify`: restores about `n` parameters (spread over the model, plus the smallest stacked
    ones and one unused tensor) from OUT and compares them bit for bit with the source tensors."""
    import numpy as np

    from mgjax.checkpoint import saved_shapes
    from mgjax.convert.mgjax_ckpt import PARAMS, read_meta, restore_leaves
    from mgjax.convert.names import param_specs
    from mgjax.convert.source import open_source

    config, meta = read_meta(Path(out))
    dt = np.dtype(meta["dtype"])
    source = open_source(src, towers_from_checkpoint=True)
    source.config = config
    saved = saved_shapes(Path(out) / PARAMS)
    specs = param_specs(saved["params"], config)
    step = max(1, len(specs) // int(n))
    pick = {s.path: s for s in specs[::step] + [specs[-1]]}
    if any(s.stack for s in specs):  # a few whole stacked parameters too, small and large
        stacked = sorted((s for s in specs if s.stack), key=lambda s: math.prod(s.shape))
        pick.update({s.path: s for s in (stacked[0], stacked[len(stacked) // 2])})
    checked = []
    for s in pick.values():
        (got,) = restore_leaves(Path(out), [(("params", *s.path), s.shape)], dt)
        want = source.array(s, got.dtype)
        if got.shape != want.shape or not np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)):
            raise SystemExit(f"verify: {'/'.join(s.path)} differs from the source")
        checked.append("/".join(s.path))
    unused = source.unused(specs)
    if unused:
        k = unused[len(unused) // 2]
        want = source.ckpt.get(k)
        (got,) = restore_leaves(Path(out), [(("unused", *k.split(".")), want.shape)], dt)
        if not np.array_equal(got.view(np.uint8), np.ascontiguousarray(want, got.dtype).view(np.uint8)):
            raise SystemExit(f"verify: unused tensor {k} differs from the source")
        checked.append(k)
    print(f"verified {len(checked)} tensors bit for bit")


# --- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    # The mgjax of this checkout (what `python -m mgjax` with cwd=ROOT runs), not an installed one.
    sys.path.insert(0, str(ROOT))
    if argv[:1] == ["_child"]:
        child(*argv[1:])
        return 0
    if argv[:1] == ["_verify"]:
        verify(*argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="MGM-7B",
                   help="preset whose released checkpoint to imitate (mgjax.config.PRESETS)")
    p.add_argument("--workdir", help="folder for the synthetic checkpoint and outputs (default: a new /tmp folder)")
    p.add_argument("--reuse", action="store_true", help="keep a complete synthetic checkpoint found in --workdir")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the outputs")
    p.add_argument("--skip-scan", action="store_true", help="measure only the per-layer layout")
    p.add_argument("--skip-per-layer", action="store_true", help="measure only the scanned layout")
    p.add_argument("--trace", action="store_true", help="record memory around every parameter group")
    p.add_argument("--no-verify", action="store_true", help="skip the bit-for-bit check of sampled outputs")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size limit of the synthetic checkpoint (1e9 B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)

    from mgjax.presets import preset

    config = preset(args.shape)
    if config.lm.scan_layers:
        sys.exit("--shape: pick a preset with the per-layer layout")
    made_workdir = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix=f"mgjax-convbench-{args.shape}-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"{args.shape}-synthetic"
    max_shard = int(args.shard_gb * GB)
    layouts = [s for s, skip in ((False, args.skip_per_layer), (True, args.skip_scan)) if not skip]
    rows = []
    try:
        info = complete_checkpoint(src, config, max_shard) if args.reuse else None
        if info:
            print(f"reusing {src}: {info['tensors']} tensors, {info['total_bytes'] / GB:.2f} GB, "
                  f"{info['shards']} shards", flush=True)
        else:
            if src.exists():
                shutil.rmtree(src)
            src.mkdir(parents=True)
            print(f"writing a synthetic {args.shape} checkpoint to {src}", flush=True)
            info = write_checkpoint(src, config, max_shard, args.seed)
            print(f"  {info['tensors']} tensors, {info['total_bytes'] / GB:.2f} GB in {info['shards']} shards, "
                  f"{info['generate_s']:.0f} s", flush=True)
        for scan in layouts:
            out = work / f"out-{'scan' if scan else 'per-layer'}"
            if out.exists():
                shutil.rmtree(out)
            need = info["total_bytes"] * (1 if args.dtype != "float32" else 2) * 1.05
            if shutil.disk_usage(work).free < need:
                sys.exit(f"{work}: not enough free disk for the output ({need / GB:.1f} GB)")
            print(f"converting ({'scan' if scan else 'per-layer'} layout)", flush=True)
            row = run_convert(src, out, scan, args.dtype, args.trace)
            row["throughput_gb_s"] = round(info["total_bytes"] / GB / row["wall_s"], 3)
            if not args.no_verify:
                v = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_verify", str(src), str(out)],
                                   check=False, cwd=ROOT, capture_output=True, text=True,
                                   env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
                if v.returncode:
                    print(v.stdout + v.stderr)
                    raise SystemExit("verification failed")
                row["verified"] = v.stdout.strip().splitlines()[-1]
                print("  " + row["verified"], flush=True)
            rows.append(row)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            for o in ("out-per-layer", "out-scan"):
                shutil.rmtree(work / o, ignore_errors=True)
            if made_workdir:
                shutil.rmtree(work, ignore_errors=True)

    head = (f"{'config':<10} {'layout':<10} {'wall s':>7} {'peak RSS GB':>12} {'anon GB':>8} "
            f"{'file GB':>8} {'output GB':>10} {'GB/s':>6}")
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{args.shape:<10} {r['layout']:<10} {r['wall_s']:>7.1f} "
              f"{r['peak_rss_gb']:>12.2f} "
              f"{r['peak_anon_gb']:>8.2f} {r['peak_file_gb']:>8.2f} {r['output_gb']:>10.2f} "
              f"{r['throughput_gb_s']:>6.3f}")
    from importlib.metadata import version

    result = {
        "benchmark": "convert_memory", "shape": args.shape, "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": [sys.executable, *sys.argv],
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)},
        "versions": {"python": platform.python_version(),
                     **{m: version(m) for m in ("jax", "jaxlib", "numpy", "orbax-checkpoint", "tensorstore",
                                                "ml_dtypes")}},
        "source": {k: info[k] for k in ("total_bytes", "tensors", "shards", "generate_s")},
        "rows": rows,
    }
    write_results(result, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
