"""Faults of the disk ([faults]): a full disk and torn checkpoints.

A full disk is injected where each writer writes, in the form that writer reports it (seen on a 2 MB tmpfs):
Orbax's arrays through tensorstore (a ValueError carrying `os_error_code='28'`), ArrayRecord through riegeli
(a RuntimeError with the errno's text), Python's own writes as OSError (EDQUOT here: a quota used up is the
same fault). Every one stops the command with exit 1 and one line naming the path and the space needed,
keeps what was whole, and the same command resumes once there is space. A torn newest checkpoint is skipped
with a warning naming it; the run resumes from the one before, to the bit.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from mgjax.cli import main
from mgjax.errors import DiskFull, MGJaxError, no_space
from mgjax.train.config import load_train_config
from mgjax.train.loop import train
from test_train import CONFIGS, losses, small_run

STAGE1 = CONFIGS / "demo" / "stage1.yaml"  # a frozen LLM and towers: the smallest state to save and restore
RUN = ["steps=4", "checkpoint_every=2", "keep_checkpoints=2", "data.buckets=[32, 64]"]


def run_args(run_dir, *extra) -> list[str]:
    return small_run(run_dir, *RUN, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A run never interrupted: steps 1-4, checkpoints at 2 and 4. Each test resumes a copy of it."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    train(load_train_config(STAGE1, run_args(run)))
    return run


def copy_of(reference: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "run"))


def assert_same_run(run: Path, reference: Path) -> None:
    """Every step's loss and gradient norm, bit for bit: the resumed run continued from a whole state."""
    got, want = losses(run), losses(reference)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]


def error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"mgjax {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- injected full disks ------------------------------------------------------------------------------

def tensorstore_full(monkeypatch, where: str) -> None:
    """Orbax's array writes into a path containing `where` fail as tensorstore fails on a full disk."""
    from orbax.checkpoint._src.serialization import serialization

    write = serialization.async_serialize_from_host

    async def full(rslices, spec, **kwargs):
        if where in json.dumps(spec):
            raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{where}": Failed to write 5406720 bytes to file '
                             f"17: {os.strerror(errno.ENOSPC)} [os_error_code='{errno.ENOSPC}']")
        return await write(rslices, spec, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", full)


def quota(monkeypatch, module, free: int) -> None:
    """`module`'s open() writes to a disk with `free` bytes left under the user's quota: a write gets in what
    fits, the next one fails with EDQUOT, as write(2) does."""
    left = [free]

    class File(io.FileIO):
        def write(self, data):
            if not left[0]:
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), self.name)
            n = super().write(memoryview(data)[:left[0]])
            left[0] -= n
            return n

    def open_(path, mode="r", buffering=-1):
        f = File(path, mode)
        return f if buffering == 0 else io.BufferedWriter(f)

    monkeypatch.setattr(module, "open", open_, raising=False)


def test_no_space_is_told_by_the_errno():
    """ENOSPC and EDQUOT however the writer reports them, through the exceptions raised from them; nothing else."""
    assert no_space(OSError(errno.ENOSPC, "x")) == errno.ENOSPC
    assert no_space(OSError(errno.EDQUOT, "x")) == errno.EDQUOT
    assert no_space(ValueError("RESOURCE_EXHAUSTED: Failed writing [os_error_code='28']")) == errno.ENOSPC
    assert no_space(RuntimeError(f"write() failed: {os.strerror(errno.EDQUOT)}; writing x")) == errno.EDQUOT
    assert no_space(OSError(errno.EACCES, os.strerror(errno.ENOSPC))) is None  # the errno decides, not the text
    assert no_space(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None
    for suppress in (False, True):
        try:
            try:
                raise OSError(errno.ENOSPC, "x")
            except OSError as e:
                raise MGJaxError("wrapped") from (None if suppress else e)
        except MGJaxError as e:
            assert no_space(e) == (None if suppress else errno.ENOSPC)


# --- checkpoints --------------------------------------------------------------------------------------

def _cut_array_file(step: Path) -> None:
    f = max((p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


TEARS = {
    "array_file_cut_short": _cut_array_file,
    "commit_marker_missing": lambda step: (step / "commit_success.txt").unlink(),
    "metadata_garbage": lambda step: (step / "_CHECKPOINT_METADATA").write_bytes(b"\x00\x17{not json"),
}


@pytest.mark.parametrize("tear", TEARS)
def test_torn_newest_checkpoint_is_skipped(reference, tmp_path, tear, caplog, capsys):
    """A torn step 4: the re-run warns naming it, resumes from step 2 and ends as the run never interrupted."""
    run = copy_of(reference, tmp_path)
    TEARS[tear](run / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, logger="mgjax.train.checkpoints"):
        assert train(load_train_config(STAGE1, run_args(run)))["step"] == 4
    assert f"checkpoint {run / 'checkpoints' / '4'} is unreadable" in caplog.text
    assert f"resumed {run} from step 2" in capsys.readouterr().err
    assert_same_run(run, reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]


def test_full_disk_at_a_checkpoint_keeps_the_last_whole_one(reference, tmp_path, monkeypatch, capsys):
    """keep_checkpoints=1, step 4 torn, and the disk full while step 4 is written again: exit 1, one line naming
    the step and the space it needs; step 2 stays whole (Orbax deletes it only once a newer step is committed).
    With the space back the same command resumes from step 2 and ends as the run never interrupted."""
    import orbax.checkpoint.experimental.v1 as ocp

    run = copy_of(reference, tmp_path)
    TEARS["commit_marker_missing"](run / "checkpoints" / "4")
    step2 = files(run / "checkpoints" / "2")
    state = ocp.checkpointables_metadata(reference / "checkpoints" / "4").metadata["state"]
    need = sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(state))  # one process holds it all
    command = ["train", str(STAGE1), *run_args(run, "keep_checkpoints=1")]
    with monkeypatch.context() as m:
        tensorstore_full(m, "/4.orbax-checkpoint-tmp/")
        assert main(command) == 1
    line = error_line(capsys.readouterr().err, "train")
    mb = float(re.search(r"needs about ([\d.]+) MB free", line).group(1))
    assert line.startswith(f"mgjax train: error: {run / 'checkpoints' / '4'}: {os.strerror(errno.ENOSPC)}")
    assert need / 2**20 <= mb < need / 2**20 + 0.1 and "resume from step 2" in line
    assert files(run / "checkpoints" / "2") == step2
    assert main(command) == 0
    assert f"resumed {run} from step 2" in capsys.readouterr().err
    assert_same_run(run, reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4"]  # step 2 went once 4 was committed


# --- the answer file ----------------------------------------------------------------------------------

class Echo:
    """A stand-in model answering each prompt with itself: what is tested is the answer file."""

    path = "echo"

    def prompt_inputs(self, prompt, images):
        return prompt, np.zeros(1), np.zeros(1)

    def generate(self, prompts, images, images_aux, **_):
        return SimpleNamespace(text=[f"answer to {p}" for p in prompts])


def test_full_disk_at_the_answer_file(tmp_path, monkeypatch):
    """Out of quota in the second batch, part of it written: exit 1 (DiskFull), one line naming the file and
    the space the answers left need; the file holds the first batch's lines, whole; the re-run answers the rest."""
    from mgjax.eval import runner

    bench = runner.Bench("echo", prompt=lambda q: q["text"], max_new_tokens=4)
    questions = [{"question_id": i, "text": f"question {i}"} for i in range(6)]
    out = tmp_path / "answers.jsonl"
    with monkeypatch.context() as m:
        quota(m, runner, free=400)  # a batch of two lines is about 300 bytes
        with pytest.raises(DiskFull) as e:
            runner.run(Echo(), bench, questions, tmp_path, out, batch_size=2)
    assert e.value.exit_code == 1 and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{out}: {os.strerror(errno.EDQUOT)} (needs about 0.1 MB free); its 2 answers")
    first = [json.loads(line) for line in out.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert out.read_text().endswith("\n") and [a["question_id"] for a in first] == [0, 1]
    runner.run(Echo(), bench, questions, tmp_path, out, batch_size=2)
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == list(range(6)) and answers[:2] == first


# --- convert, export, data pack -----------------------------------------------------------------------

def assert_nothing_left(out: Path) -> None:
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_full_disk_in_convert_leaves_nothing(tmp_path, monkeypatch, capsys):
    from helpers import GOLDEN

    out = tmp_path / "converted"
    with monkeypatch.context() as m:
        tensorstore_full(m, f"/.{out.name}.partial/")
        assert main(["convert", str(GOLDEN / "llama_vicuna" / "MGM-7B-tiny"), str(out), "--dtype", "float32"]) == 1
    line = error_line(capsys.readouterr().err, "convert")
    assert line.startswith(f"mgjax convert: error: {out}: {os.strerror(errno.ENOSPC)} (needs about ")
    assert "nothing half-written is left" in line
    assert_nothing_left(out)


def test_full_disk_in_export_leaves_nothing(reference, tmp_path, monkeypatch, capsys):
    from mgjax.convert import export

    out = tmp_path / "exported"
    with monkeypatch.context() as m:
        quota(m, export, free=100_000)
        assert main(["export", str(reference), str(out)]) == 1
    line = error_line(capsys.readouterr().err, "export")
    assert line.startswith(f"mgjax export: error: {out}: {os.strerror(errno.EDQUOT)} (needs about ")
    assert_nothing_left(out)
    assert main(["export", str(reference), str(out)]) == 0  # space again: the same command


def test_full_disk_in_data_pack_leaves_nothing(tmp_path, monkeypatch, capsys):
    from array_record.python import array_record_module

    from mgjax.data.synthetic import SyntheticShapes

    json_path = SyntheticShapes(6, seed=3).write(tmp_path / "src")
    writer = array_record_module.ArrayRecordWriter

    class Full:  # riegeli's message when write(2) fails: the errno's text, no number
        def __init__(self, path, options):
            self.path, self.writer = path, writer(path, options)

        def write(self, data):
            raise RuntimeError(f"write() failed: {os.strerror(errno.ENOSPC)}; writing {self.path}; at byte 0")

        def close(self):
            self.writer.close()

    out = tmp_path / "packed"
    command = ["data", "pack", str(json_path), str(tmp_path / "src"), str(out)]
    with monkeypatch.context() as m:
        m.setattr(array_record_module, "ArrayRecordWriter", Full)
        assert main(command) == 1
    line = error_line(capsys.readouterr().err, "data")
    images = sum(p.stat().st_size for p in (tmp_path / "src" / "images").iterdir())
    assert line.startswith(f"mgjax data: error: {out}: {os.strerror(errno.ENOSPC)} "
                           f"(needs about {np.ceil(images / 2**20 * 10) / 10:.1f} MB free)")
    assert_nothing_left(out)
    assert main(command) == 0
