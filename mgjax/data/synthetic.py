"""Synthetic demo data: one coloured shape at one of four positions, with captions (stage 1) and one-word
question answering (stage 2). Deterministic from a seed, made on the fly (a source like the others), and
writable as JSON + PNGs for `mgjax data pack`.

Every image is a distinct spec (colour, shape, position, offset, size); the specs are split once, by the
seed, into a training and a held-out set, so the two splits never share an image.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
             "position": "Where is the shape?"}
# One-word answers: a position is hyphenated ("top-left").
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(p.replace(" ", "-") for p in POSITIONS)}
# Accuracy of a uniform guess among the possible answers of each question type.
CHANCE = {q: 1 / len(a) for q, a in ANSWERS.items()}
_OFFSETS = (-3, 0, 3)  # jitter of the shape's centre, in 1/32 of the side
_SIZES = (5, 6, 7)  # the shape's half-size, in 1/32 of the side


def _specs() -> list[tuple]:
    return list(itertools.product(COLOURS, SHAPES, POSITIONS, _OFFSETS, _OFFSETS, _SIZES))


def draw(spec: tuple, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]: the shape of `spec` on a light grey background."""
    colour, shape, position, dx, dy, half = spec
    img = Image.new("RGB", (size, size), (235, 235, 235))
    unit = size / 32
    cx = (8 if "left" in position else 24) * unit + dx * unit
    cy = (8 if "top" in position else 24) * unit + dy * unit
    r = half * unit
    box = (cx - r, cy - r, cx + r, cy + r)
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return np.asarray(img)


class SyntheticShapes:
    """A source (`len`, `[i]`, `lengths`) of `num_samples` records of one split and stage.

    stage 1: `<image>` + a caption ("a red circle at the top left"); stage 2: one to three questions in a
    random order with one-word answers (`question_types` limits them; the held-out split asks one each).
    `answer(i)` gives the (question type, answer) pairs of sample i.
    """

    def __init__(self, num_samples: int, *, split: str = "train", stage: int = 2, seed: int = 0,
                 image_size: int = 64, heldout_fraction: float = 0.1, question_types=tuple(QUESTIONS)):
        if split not in ("train", "heldout") or stage not in (1, 2):
            raise ValueError(f"split {split!r} / stage {stage!r}: use 'train' or 'heldout', and stage 1 or 2")
        specs = _specs()
        order = np.random.default_rng([seed, 0]).permutation(len(specs))
        n_held = max(1, int(len(specs) * heldout_fraction))
        chosen = order[:n_held] if split == "heldout" else order[n_held:]
        self.specs = [specs[i] for i in chosen]
        self.num_samples, self.split, self.stage, self.seed = num_samples, split, stage, seed
        self.image_size, self.question_types = image_size, tuple(question_types)
        self.lengths = np.asarray([sum(len(t["value"].split()) for t in self._turns(i)) for i in range(num_samples)],
                                  np.int32)

    def __len__(self) -> int:
        return self.num_samples

    def spec(self, index: int) -> tuple:
        return self.specs[index % len(self.specs)]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 1 if self.split == "train" else 2, index])

    def answer(self, index: int) -> list[tuple[str, str]]:
        colour, shape, position = self.spec(index)[:3]
        truth = {"colour": colour, "shape": shape, "position": position.replace(" ", "-")}
        rng = self._rng(index)
        if self.split == "heldout":
            kinds = [self.question_types[index % len(self.question_types)]]
        else:
            kinds = list(rng.permutation(self.question_types)[:rng.integers(1, len(self.question_types) + 1)])
        return [(k, truth[k]) for k in kinds]

    def _turns(self, index: int) -> list[dict]:
        if self.stage == 1:
            colour, shape, position = self.spec(index)[:3]
            return [{"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": f"a {colour} {shape} at the {position}"}]
        turns = []
        for j, (kind, answer) in enumerate(self.answer(index)):
            question = QUESTIONS[kind] + " Answer with one word."
            turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + question},
                      {"from": "gpt", "value": answer}]
        return turns

    def __getitem__(self, index: int) -> dict:
        return {"id": f"shapes-{self.split}-s{self.stage}-{index}", "images": [draw(self.spec(index), self.image_size)],
                "conversations": self._turns(index)}

    def write(self, folder: str | os.PathLike) -> Path:
        """`folder/data.json` (LLaVA format) and `folder/images/*.png`; returns the JSON path."""
        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(len(self)):
            r = self[i]
            name = f"images/{r['id']}.png"
            buf = io.BytesIO()
            Image.fromarray(r["images"][0]).save(buf, format="PNG")
            (folder / name).write_bytes(buf.getvalue())
            records.append({"id": r["id"], "image": name, "conversations": r["conversations"]})
        path = folder / "data.json"
        path.write_text(json.dumps(records, indent=1))
        return path
