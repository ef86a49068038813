"""Conversion to Orbax and back, stage-1 releases, and the convert/export CLI.

Checks: convert -> load gives the logits of the released folder (1e-5 x scale, as the golden tests;
here they are in fact identical programs on identical numbers); export gives back every source
tensor bit for bit (names, dtypes, values), for both parameter layouts and for bfloat16.
"""

import functools
import json
import os
import shutil
import stat
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mgjax
from mgjax.cli import main
from mgjax.convert.export import export
from mgjax.convert.mgjax_ckpt import convert
from mgjax.convert.readers import Checkpoint
from mgjax.errors import MGJaxError
from helpers import GOLDEN, assert_close, nhwc

CASE = GOLDEN / "llama_vicuna"
SRC = CASE / "MGM-7B-tiny"
CLIP_TOWER = CASE / "model_zoo/OpenAI/clip-vit-large-patch14-336-tiny"
MM_PREFIXES = ("model.mm_projector", "model.vlm_uni", "model.vision_tower")


@functools.cache
def reference():
    ref = np.load(CASE / "expected.npz")
    return (ref["input_ids"], nhwc(ref["images"]), nhwc(ref["images_aux"])), ref["logits"]


def logits_of(model):
    inputs, _ = reference()
    return np.asarray(model.logits(*inputs))


def same_tensors(a_dir, b_dir, cast=None):
    a, b = Checkpoint.from_folder(a_dir), Checkpoint.from_folder(b_dir)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        x = x.astype(cast) if cast is not None else x
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
def test_convert_load_export_round_trip(tmp_path, scan):
    out = convert(SRC, tmp_path / "orbax", dtype="float32", scan_layers=scan)
    meta = json.loads((out / "mgjax_config.json").read_text())
    assert meta["config"]["lm"]["scan_layers"] is scan  # the layout is recorded
    model = mgjax.load_pretrained(out)
    assert model.config.lm.scan_layers is scan
    if scan:
        assert model.params["llm"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 128)
    assert_close(logits_of(model), reference()[1], what="logits after convert")
    assert model.tokenizer.bos_token_id == 1  # tokenizer files travel with the checkpoint
    # Export next to the tower folders so that config.json's relative tower paths resolve for the
    # original code (and for mgjax, whose CLIP architecture comes from that folder).
    case = tmp_path / "case"
    shutil.copytree(CASE / "model_zoo", case / "model_zoo")
    exported = export(out, case / "exported")
    same_tensors(SRC, exported)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = {index["weight_map"][k] for k in index["weight_map"] if k.startswith(MM_PREFIXES)}
    assert len(shards) == 1  # CLIP sits in the shard with vlm_uni_*, as the original loader needs
    # The export loads per-layer whatever the converted layout: the same program as the source's on the
    # same numbers gives the same logits bit for bit; the scanned program sums in another order.
    again = logits_of(mgjax.load_pretrained(exported))
    np.testing.assert_array_equal(again, logits_of(mgjax.load_pretrained(SRC) if scan else model))
    assert_close(again, logits_of(model), what="exported vs converted logits")


def test_bfloat16_round_trip_and_sharding(tmp_path):
    out = convert(SRC, tmp_path / "orbax", dtype="bfloat16")
    model = mgjax.load_pretrained(out, dtype="bfloat16")
    assert model.params["llm"]["norm"]["scale"].dtype == ml_dtypes.bfloat16
    exported = export(out, tmp_path / "exported", max_shard_bytes=100_000)
    same_tensors(SRC, exported, cast=ml_dtypes.bfloat16)
    assert len(list(exported.glob("model-*-of-*.safetensors"))) > 2  # the LLM spread over small shards
    # bf16 weights, f32 compute would drift; bf16 end to end stays near the f32 reference
    assert np.abs(logits_of(model) - reference()[1]).max() < 0.15


def _writable_copy(src, dst):
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        os.chmod(p, p.stat().st_mode | stat.S_IWUSR)
    return dst


def _stage1_release(tmp_path):
    """Case A split the way the releases are: a stage-1 folder (config.json + mm_projector.bin with
    the projector, mining and tower weights) and a plain HF LLM folder."""
    tensors = {}
    for shard in SRC.glob("*.safetensors"):
        tensors.update(load_file(shard))
    stage1, base = tmp_path / "MGM-7B-Pretrain", tmp_path / "vicuna-7b-tiny"
    stage1.mkdir()
    base.mkdir()
    in_stage1 = MM_PREFIXES + ("model.vision_tower_aux",)
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(in_stage1)},
               stage1 / "mm_projector.bin")
    shutil.copy(SRC / "config.json", stage1 / "config.json")
    save_file({k: v for k, v in tensors.items() if not k.startswith(in_stage1)},
              base / "model.safetensors")
    hf = json.loads((SRC / "config.json").read_text())
    llm_cfg = {k: v for k, v in hf.items() if not k.startswith(("mm_", "image_", "tokenizer_", "optimize_"))}
    llm_cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (base / "config.json").write_text(json.dumps(llm_cfg))
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SRC / f, base / f)
    shutil.copytree(CASE / "model_zoo", tmp_path / "model_zoo")
    return stage1, base


def test_stage1_release_on_a_base_llm(tmp_path):
    stage1, base = _stage1_release(tmp_path)
    with pytest.raises(MGJaxError, match="stage-1 release.*base_llm"):
        mgjax.load_pretrained(stage1)
    model = mgjax.load_pretrained(stage1, base_llm=base)
    assert_close(logits_of(model), reference()[1], what="stage-1 + base logits")
    assert model.tokenizer.bos_token_id == 1  # from the base LLM folder
    out = convert(stage1, tmp_path / "orbax", dtype="float32", base_llm=base)
    np.testing.assert_array_equal(logits_of(mgjax.load_pretrained(out)), logits_of(model))


def test_cli_convert_export_and_errors(tmp_path, capsys):
    assert main(["convert", str(SRC), str(tmp_path / "o"), "--dtype", "float32"]) == 0
    assert main(["export", str(tmp_path / "o"), str(tmp_path / "e")]) == 0
    same_tensors(SRC, tmp_path / "e")
    capsys.readouterr()
    # exit code 2 with a one-line reason naming the file, key or folder
    assert main(["convert", str(SRC), str(tmp_path / "o")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    bad = _writable_copy(SRC, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "bert", "architectures": ["BertModel"]}))
    assert main(["convert", str(bad), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model_type 'bert'" in err and "\n" not in err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "e2")]) == 2
    assert "mgjax_config.json" in capsys.readouterr().err


def test_truncated_orbax_checkpoint(tmp_path):
    out = convert(SRC, tmp_path / "orbax", dtype="float32")
    for f in (out / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 10_000:
            f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(MGJaxError, match="cannot restore the checkpoint"):
        mgjax.load_pretrained(out)


def _convert_cmd(out, *extra):
    return [sys.executable, "-m", "mgjax", "convert", str(SRC), str(out), "--dtype", "float32", *extra]


@pytest.mark.parametrize("job", ["convert", "export"])
@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupted_job_leaves_nothing_and_reruns(tmp_path, job, sig, code):
    """convert or export interrupted while the temporary folder is being written: exit 130 / 143 with
    one line, no temporary folder, no OUT; the same command then succeeds."""
    import signal
    import subprocess
    import time

    out = tmp_path / "out"
    partial = tmp_path / ".out.partial"
    if job == "convert":
        cmd = _convert_cmd(out)
    else:
        ckpt = convert(SRC, tmp_path / "orbax", dtype="float32")
        cmd = [sys.executable, "-m", "mgjax", "export", str(ckpt), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert partial.exists(), f"the {job} finished before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert err.count("\n") == 1 and "nothing half-written" in err, err
    assert not partial.exists() and not out.exists()
    assert main(cmd[3:]) == 0  # the same command, in this process (a second interpreter costs seconds)
    if job == "convert":
        assert mgjax.load_pretrained(out).config.lm == mgjax.load_pretrained(SRC).config.lm
    else:
        same_tensors(SRC, out)


def test_output_folder_checks(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, culprit in ((a_file, "is a file"), (a_file / "sub", "cannot write the output there")):
        assert main(["convert", str(SRC), str(out)]) == 2
        err = capsys.readouterr().err
        assert culprit in err and err.count("\n") == 1, err
    out = tmp_path / "out"
    assert main(["convert", str(SRC), str(out), "--dtype", "float32"]) == 0
    assert main(["convert", str(SRC), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(SRC), str(out), "--overwrite"]) == 0  # now bfloat16
    assert json.loads((out / "mgjax_config.json").read_text())["dtype"] == "bfloat16"
    exported = tmp_path / "exported"
    assert main(["export", str(out), str(exported)]) == 0
    assert main(["export", str(out), str(exported)]) == 2
    assert main(["export", str(out), str(exported), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "file", "out"]  # no temporary folders


def test_progress_bar_only_on_a_terminal():
    import io

    from mgjax.progress import Progress

    quiet = io.StringIO()  # not a terminal: nothing, so logs stay clean
    with Progress("convert x", 4, 4000, file=quiet) as p:
        p.update(1, 1000)
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    with Progress("convert x", 4, 4_000_000_000, file=shown, enabled=True) as p:
        for _ in range(4):
            p.update(1, 1_000_000_000)
    last = shown.getvalue().split("\r")[-1]
    assert "convert x: 4/4 tensors, 4.00/4.00 GB" in last and "MB/s" in last and "ETA 0:00" in last
    # No bytes: the rate and ETA count items, those done before a resume excluded.
    p = Progress("train r", 10, unit="steps", file=io.StringIO(), done=4)
    p.start -= 2.0  # two seconds for the two steps of this process
    p.update(2)
    assert p.line().startswith("train r: 6/10 steps, 1.0") and p.line().endswith("ETA 0:04")


def test_convert_draws_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    convert(SRC, tmp_path / "out", dtype="float32")
    err = capsys.readouterr().err
    assert f"convert {SRC.name}:" in err and "parameters" in err and "ETA" in err


def test_bf16_release_round_trip_with_the_convnext_from_its_folder(tmp_path):
    """Golden case A-bf16 (saved by the original's bf16 recipe): its ConvNeXt is read from the float32 tower
    folder, as the original reads it. Converted at bfloat16 and exported, every tensor comes back bit for
    bit (the checkpoint's ConvNeXt copy is the folder's rounded to bf16, as the original's training saves
    it), and the export loads to the source's parameters."""
    from flax import traverse_util

    case = GOLDEN / "llama_vicuna_bf16"
    src = case / "MGM-7B-tiny"
    out = convert(src, tmp_path / "orbax", dtype="bfloat16")
    meta = json.loads((out / "mgjax_config.json").read_text())
    assert (meta["towers"]["vision_tower"]["weights"], meta["towers"]["vision_tower_aux"]["weights"]) == (
        "checkpoint", "folder")
    shutil.copytree(case / "model_zoo", tmp_path / "model_zoo")
    exported = export(out, tmp_path / "exported")
    same_tensors(src, exported)
    assert json.loads((exported / "config.json").read_text())["optimize_vision_tower_aux"] is False
    want, got = (traverse_util.flatten_dict(mgjax.load_pretrained(p).params) for p in (src, exported))
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg="/".join(k))


def test_ctrl_c_at_any_moment_of_start_up_exits_130_with_one_line(tmp_path):
    """SIGINT while the command starts (Python importing mgjax, JAX, Flax, torch; the parser; set-up) or
    works: exit 130 with the one line, no traceback and no output; or, sent after the command has ended, its
    normal exit with a whole OUT. Five convert processes, signalled 0.3 to 3 s after they start (0.1 s, on a
    loaded 2-core machine, could land in Python's own start-up, compiling bytecode before mgjax's first line
    runs, where no program's handler is in place yet)."""
    import signal
    import subprocess
    import time

    delays = (0.3, 0.6, 1.0, 2.0, 3.0)
    procs = []
    for i, delay in enumerate(delays):
        out = tmp_path / f"out{i}"
        procs.append((out, delay, subprocess.Popen(_convert_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   text=True)))
    start = time.monotonic()
    for _, delay, proc in procs:
        time.sleep(max(0.0, start + delay - time.monotonic()))
        proc.send_signal(signal.SIGINT)
    codes = []
    for out, delay, proc in procs:
        _, err = proc.communicate(timeout=300)
        codes.append(proc.returncode)
        if proc.returncode == 0:
            assert mgjax.load_pretrained(out).config.lm == mgjax.load_pretrained(SRC).config.lm
            continue
        assert proc.returncode == 130, (delay, err[-2000:])
        assert err == "mgjax convert: interrupted; nothing half-written was left\n", (delay, err[-2000:])
        assert not out.exists() and not (tmp_path / f".out{delay}.partial").exists()
    assert codes[0] == 130  # at 0.3 s the command is still importing
