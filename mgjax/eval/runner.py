"""Answering a benchmark's question file in jitted batches, into the LLaVA answer JSONL the official
scorers read: one line `{question_id, prompt, text, answer_id, model_id, metadata}` per question.

Resumable: answers are appended and flushed batch by batch; a re-run skips the question ids already
answered (a line cut short by a kill is dropped). Several hosts split the questions (host i takes every
n-th) and each writes its own part file, merged by host 0 at the end in question order. Each host runs
its model on its own devices (a mesh over its local devices, or none).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mgjax.errors import MGJaxError
from mgjax.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bench:
    """How the paper evaluates one benchmark (MGM_SPEC section 10): its prompt and decoding."""

    name: str
    prompt: Callable[[dict], str]  # question record -> the user's text (the image marker is added)
    max_new_tokens: int
    temperature: float = 0.0
    # what else an answer line carries for the benchmark's scorer (e.g. MMBench's round and options)
    answer_fields: Callable[[dict], dict] = lambda q: {}


def read_questions(path: str | os.PathLike) -> list[dict]:
    """A JSONL (or JSON list) question file; every record needs a question_id, ids unique."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MGJaxError(f"{path}: cannot read the questions ({e.strerror})") from None
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise MGJaxError(f"{path}: not JSONL or a JSON list ({e})") from None
    seen = set()
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or "question_id" not in r:
            raise MGJaxError(f"{path}: record {n} has no question_id")
        if r["question_id"] in seen:
            raise MGJaxError(f"{path}: question_id {r['question_id']!r} appears twice")
        seen.add(r["question_id"])
    return records


def _image_names(record: dict) -> list[str]:
    names = record.get("image") or []
    return [names] if isinstance(names, str) else list(names)


def _images(record: dict, root: Path) -> list:
    """A question's images: files under `root` named by "image", or encoded bytes in "image_bytes"."""
    return [root / n for n in _image_names(record)] + list(record.get("image_bytes", ()))


def _answered(path: Path) -> set:
    """Question ids already in an answer file; a last line cut short by a kill is removed from the file."""
    if not path.is_file():
        return set()
    lines = path.read_text().splitlines(keepends=True)
    done, keep = set(), []
    for line in lines:
        try:
            done.add(json.loads(line)["question_id"])
            keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            log.warning("%s: dropping a damaged line (a run stopped mid-write)", path)
    if len(keep) != len(lines) or (lines and not lines[-1].endswith("\n")):
        path.write_text("".join(keep))
    return done


def part_path(out: Path, process_index: int, process_count: int) -> Path:
    return out if process_count == 1 else out.with_name(f"{out.name}.part{process_index}-of-{process_count}")


def run(model, bench: Bench, questions: list[dict], image_root: str | os.PathLike, out: str | os.PathLike, *,
        batch_size: int = 8, model_id: str | None = None, process_index: int = 0, process_count: int = 1) -> Path:
    """Answers `questions` (this host's share) into `out` (its part file with several hosts); returns it."""
    root, out = Path(image_root), Path(out)
    mine = questions[process_index::process_count]
    missing = [(q["question_id"], n) for q in mine for n in _image_names(q) if not (root / n).is_file()]
    if missing:
        shown = ", ".join(f"{qid}: {n}" for qid, n in missing[:3])
        raise MGJaxError(f"{len(missing)} image(s) of the questions are not under {root} ({shown}"
                         f"{', ...' if len(missing) > 3 else ''}); check --images")
    path = part_path(out, process_index, process_count)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _answered(path)
    todo = [q for q in mine if q["question_id"] not in done]
    model_id = model_id or Path(model.path).name
    with open(path, "a") as f, Progress(f"eval {bench.name}", len(mine), unit="questions", done=len(mine) - len(todo)) \
            as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            inputs = []
            for q in batch:
                try:
                    inputs.append(model.prompt_inputs(bench.prompt(q), _images(q, root)))
                except MGJaxError as e:
                    raise MGJaxError(f"question {q['question_id']!r}: {e}") from None
            # truncate: a prompt longer than the model's maximum is cut at its end, as the original does
            result = model.generate([i[0] for i in inputs], np.concatenate([i[1] for i in inputs]),
                                    np.concatenate([i[2] for i in inputs]), max_new_tokens=bench.max_new_tokens,
                                    temperature=bench.temperature, truncate=True)
            for q, text in zip(batch, result.text):
                f.write(json.dumps({"question_id": q["question_id"], "prompt": bench.prompt(q), "text": text,
                                    "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {},
                                    **bench.answer_fields(q)}) + "\n")
            f.flush()
            bar.update(len(batch))
    return path


def merge_parts(questions: list[dict], out: str | os.PathLike, process_count: int) -> Path:
    """Host 0, once every host has finished: the part files -> `out`, in question order."""
    out = Path(out)
    answers = {}
    for i in range(process_count):
        for line in part_path(out, i, process_count).read_text().splitlines():
            a = json.loads(line)
            answers[a["question_id"]] = line
    lost = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if lost:
        raise MGJaxError(f"{len(lost)} question(s) have no answer in the part files (first: {lost[0]!r})")
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text("".join(answers[q["question_id"]] + "\n" for q in questions))
    tmp.replace(out)
    for i in range(process_count):
        part_path(out, i, process_count).unlink()
    return out
