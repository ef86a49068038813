"""Answering a benchmark's question file in jitted batches, into the LLaVA answer JSONL the official
scorers read: one line `{question_id, prompt, text, answer_id, model_id, metadata}` per question.

Resumable: answers are appended batch by batch, each batch whole or not at all (a disk that fills up
midway stops the run with `DiskFull`, the file as it was before the batch); a re-run skips the questions
already answered (a line cut short by a kill is dropped). A question_id may appear more than once (LLaVA's
TextVQA file uses the image id, shared by the questions on one image): the k-th answer with an id answers
the k-th question with it. Several hosts split the questions (host i takes every n-th) and each writes its own part
file, merged by host 0 at the end in question order. Each host runs its model on its own devices (a mesh
over its local devices, or none).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mgjax.errors import MGJaxError, stop_when_full
from mgjax.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bench:
    """How the paper evaluates one benchmark (MGM_SPEC section 10): its prompt and decoding."""

    name: str
    prompt: Callable[[dict], str]  # question record -> the user's text (the image marker is added)
    max_new_tokens: int
    temperature: float = 0.0
    num_beams: int = 1
    # what else an answer line carries for the benchmark's scorer (e.g. MMBench's round and options)
    answer_fields: Callable[[dict], dict] = lambda q: {}
    # the answer the original gives a question without asking the model (MMMU's questions without an image),
    # or None: ask the model
    preset: Callable[[dict], str | None] = lambda q: None
    # whether a question record carries its answer (the benchmark's data can be scored locally)
    has_answer: Callable[[dict], bool] = lambda q: q.get("answer") not in (None, "")


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a benchmark as its maintainers distribute it: Parquet (a file, a folder of them, or a glob
    such as `MMMU/*/validation-*.parquet`), a JSON list, a JSON object of records, or JSONL."""
    path = str(path)
    files = sorted(glob.glob(path, recursive=True)) if any(c in path for c in "*?[") else \
        sorted(str(p) for p in Path(path).rglob("*.parquet")) if os.path.isdir(path) else [path]
    if not files:
        raise MGJaxError(f"{path}: no such file, or no Parquet file under it")
    if all(f.endswith(".parquet") for f in files):
        import pyarrow.parquet as pq

        try:
            return [row for f in files for row in pq.read_table(f).to_pylist()]
        except (OSError, ValueError) as e:
            raise MGJaxError(f"{path}: cannot read the Parquet file(s) ({e})") from None
    if len(files) > 1:
        raise MGJaxError(f"{path}: matches several files that are not all Parquet")
    try:
        text = Path(files[0]).read_text()
    except OSError as e:
        raise MGJaxError(f"{files[0]}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise MGJaxError(f"{files[0]}: not Parquet, JSON or JSONL ({e})") from None
    if isinstance(data, dict):  # {id: record} (MathVista's testmini.json), or the one line of a JSONL file
        data = list(data.values()) if data and all(isinstance(v, dict) for v in data.values()) else [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MGJaxError(f"{files[0]}: its records are not JSON objects")
    return data


def read_questions(path: str | os.PathLike) -> list[dict]:
    """A question file (JSONL, a JSON list, ...: see `read_rows`); every record needs a question_id."""
    records = read_rows(path)
    for n, r in enumerate(records, 1):
        if "question_id" not in r:
            raise MGJaxError(f"{path}: record {n} has no question_id")
    return records


def _image_names(record: dict) -> list[str]:
    names = record.get("image") or []
    return [names] if isinstance(names, str) else list(names)


def _images(record: dict, root: Path) -> list:
    """A question's images: files under `root` named by "image", or encoded bytes in "image_bytes"."""
    return [root / n for n in _image_names(record)] + list(record.get("image_bytes", ()))


def _answered(path: Path) -> Counter:
    """How many answers each question id has in an answer file; a last line cut short by a kill is removed
    from the file."""
    if not path.is_file():
        return Counter()
    lines = path.read_text().splitlines(keepends=True)
    done, keep = Counter(), []
    for line in lines:
        try:
            done[json.loads(line)["question_id"]] += 1
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
    todo = []
    for q in mine:  # the first done[id] questions with an id are answered
        if done[q["question_id"]]:
            done[q["question_id"]] -= 1
        else:
            todo.append(q)
    model_id = model_id or Path(model.path).name
    with open(path, "ab", buffering=0) as f, Progress(f"eval {bench.name}", len(mine), unit="questions",
                                                      done=len(mine) - len(todo)) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = [bench.preset(q) for q in batch]
            asked = [q for q, t in zip(batch, texts) if t is None]
            inputs = []
            for q in asked:
                try:
                    inputs.append(model.prompt_inputs(bench.prompt(q), _images(q, root)))
                except MGJaxError as e:
                    raise MGJaxError(f"question {q['question_id']!r}: {e}") from None
            if asked:
                # truncate: a prompt longer than the model's maximum is cut at its end, as the original does;
                # a sampling benchmark draws from a seed per batch (its start among this host's questions)
                result = model.generate([i[0] for i in inputs], np.concatenate([i[1] for i in inputs]),
                                        np.concatenate([i[2] for i in inputs]), max_new_tokens=bench.max_new_tokens,
                                        temperature=bench.temperature, num_beams=bench.num_beams,
                                        seed=len(mine) - len(todo) + start, truncate=True)
                answers = iter(result.text)
                texts = [next(answers) if t is None else t for t in texts]
            lines = "".join(json.dumps({"question_id": q["question_id"], "prompt": bench.prompt(q), "text": text,
                                        "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {},
                                        **bench.answer_fields(q)}) + "\n" for q, text in zip(batch, texts)).encode()
            left = len(todo) - start  # questions without an answer yet, this batch's included
            with stop_when_full(path, lambda: len(lines) * left // len(batch),
                                f"its {len(mine) - left} answers are whole: free space and run the same command "
                                "to answer the rest"):
                _append(f, lines)
            bar.update(len(batch))
    return path


def _append(f, data: bytes) -> None:
    """Writes `data` at the end of the unbuffered file `f`, or on an error (a disk full midway) nothing: what
    a write got in is cut off again, so that the file holds whole lines, usable as they are."""
    end = f.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:  # a write stops short when the space runs out; the next one raises
            view = view[f.write(view):]
    except OSError:
        f.truncate(end)
        raise


def merge_parts(questions: list[dict], out: str | os.PathLike, process_count: int) -> Path:
    """Host 0, once every host has finished: the part files -> `out`, in question order."""
    out = Path(out)
    merged = [None] * len(questions)
    for i in range(process_count):
        lines = defaultdict(list)  # question id -> this host's answer lines, in its question order
        for line in part_path(out, i, process_count).read_text().splitlines():
            lines[json.loads(line)["question_id"]].append(line)
        for n in range(i, len(questions), process_count):
            if lines[questions[n]["question_id"]]:
                merged[n] = lines[questions[n]["question_id"]].pop(0)
    if None in merged:
        qid = questions[merged.index(None)]["question_id"]
        raise MGJaxError(f"question {qid!r} has no answer in the part files of {out}")
    tmp, text = out.with_name(out.name + ".partial"), "".join(line + "\n" for line in merged).encode()
    with stop_when_full(out, lambda: len(text), "the part files are kept: free space and run the same command "
                        "to merge them"):
        try:
            tmp.write_bytes(text)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(out)
    for i in range(process_count):
        part_path(out, i, process_count).unlink()
    return out
