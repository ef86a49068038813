"""The `mgjax` command: success prints the prediction, bad input exits 2 with a one-line reason."""

import json

import numpy as np

from mgjax.cli import main
from helpers import GOLDEN

CASE = GOLDEN / "llama_vicuna"


def test_predict_prints_the_originals_first_token(capsys):
    assert main(["predict", str(CASE / "MGM-7B-tiny"), "--image", str(CASE / "input.jpg"), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    first = int(np.load(CASE / "expected.npz")["generate_ids"][0, 0])
    assert out.splitlines()[3].split()[0] == str(first)  # the top line of "next token:"
    assert json.loads((CASE / "case.json").read_text())["prompt"] in out.replace("\\n", "\n")


def test_bad_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(CASE / "MGM-7B-tiny"), "--image", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgjax predict: error:") and str(bad) in err and "\n" not in err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope"), "--image", str(CASE / "input.jpg")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
