"""Training records in the LLaVA/MGM JSON format, and the bookkeeping of the ones that must be skipped.

A record is `{"id", "image": "rel/path" | ["a", "b"] | absent, "conversations": [{"from": "human" | "gpt",
"value": ...}]}`; the file is a JSON list or JSONL (one record per line). One `<image>` per image, at most
one per message.
Parsed records are plain dicts `{"id": str, "images": [...], "conversations": [...]}` where `images`
holds paths, file bytes or uint8 arrays: whatever `load_image` reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from mgjax.data.templates import IMAGE_MARKER
from mgjax.errors import MGJaxError

log = logging.getLogger(__name__)


class BadRecord(Exception):
    """A record that is skipped: `reason` is one of a few fixed words (the counters' keys)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class BadRecords:
    """Counts skipped records by reason and logs each with its id."""

    def __init__(self, what: str):
        self.what = what
        self.counts: Counter[str] = Counter()

    def add(self, record_id: str, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        log.warning("%s: skipped record %s: %s (%s)", self.what, record_id, reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) or "none"


def _load_json(path: Path) -> list:
    """A JSON list, or JSONL; line numbers in errors are 1-based."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MGJaxError(f"{path}: cannot read the records file ({type(e).__name__}: {e})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MGJaxError(f"{path}: not valid JSON ({e}); expected a list of records or JSONL") from None
        return data
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                # One broken line is a bad record, not a broken file: keep its position for the log.
                rows.append(BadRecord("malformed", f"{path} line {i}: not valid JSON ({e.msg})"))
    return rows


def parse_record(obj: Any, index: int) -> dict:
    """One JSON object -> `{"id", "images": [relative paths], "conversations"}`; raises BadRecord."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord("malformed", f"a {type(obj).__name__}, not an object")
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("malformed", "'conversations' is missing or not a non-empty list")
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            raise BadRecord("malformed", f"conversations[{j}] is not {{'from': 'human' | 'gpt', 'value': str}}")
    image = obj.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadRecord("malformed", "'image' is neither a path nor a list of paths")
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise BadRecord("no_assistant_turn", "no non-empty 'gpt' turn to learn from")
    if any(t["value"].count(IMAGE_MARKER) > 1 for t in turns):
        # The original moves a message's marker to its start, merging several into one.
        raise BadRecord("image_count", f"a message with several {IMAGE_MARKER}; put each image's marker in its own "
                                       "message")
    markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
    if markers != len(images):
        raise BadRecord("image_count", f"{len(images)} image(s) but {markers} {IMAGE_MARKER} marker(s); "
                                       f"every image needs exactly one {IMAGE_MARKER}")
    return {"id": str(obj.get("id", index)), "images": images, "conversations": turns}


def read_records(path: str | os.PathLike, bad: BadRecords | None = None) -> Iterator[dict]:
    """The well-formed records of a JSON / JSONL file, in order; the others go to `bad`."""
    path = Path(path)
    if not path.is_file():
        raise MGJaxError(f"{path}: records file not found")
    data = _load_json(path)
    if not isinstance(data, list):
        raise MGJaxError(f"{path}: holds a JSON {type(data).__name__}; expected a list of records (or JSONL)")
    bad = bad if bad is not None else BadRecords(str(path))
    for i, obj in enumerate(data):
        try:
            yield parse_record(obj, i)
        except BadRecord as e:
            rid = obj.get("id", i) if isinstance(obj, dict) else i
            bad.add(str(rid), e.reason, e.detail)


def modality_length(record: dict) -> int:
    """The original's `modality_lengths`: words in all turns, negative for text-only samples (the sign
    is what groups image and text-only samples apart)."""
    words = sum(len(t["value"].split()) for t in record["conversations"])
    return words if record["images"] else -max(words, 1)
