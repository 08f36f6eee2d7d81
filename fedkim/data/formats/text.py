"""Questions as JSONL: one object per line with sample_id, question, options and answer.

Optional `choices`: for lettered multiple choice ("... A. x B. y"), each option label's text ({"A": "x", ...});
evaluation can then score the texts themselves (fedkim.central.evaluate, eval.choice_scoring)."""

from __future__ import annotations

import json
from pathlib import Path

from fedkim.data.formats import FormatError

REQUIRED_KEYS = ("sample_id", "question", "options", "answer")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> dict[str, dict]:
    """sample_id -> row; a malformed line is a FormatError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "file not found")
    rows: dict[str, dict] = {}
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatError(path, f"line {number}: not valid JSON ({exc.msg})") from None
            missing = [k for k in REQUIRED_KEYS if k not in row]
            if missing:
                raise FormatError(path, f"line {number}: missing key(s) {missing}")
            if row["answer"] not in row["options"]:
                raise FormatError(path, f"line {number}: answer {row['answer']!r} is not among the options")
            choices = row.get("choices")
            if choices is not None and (not isinstance(choices, dict) or set(choices) != set(row["options"])
                                        or not all(isinstance(v, str) and v.strip() for v in choices.values())):
                raise FormatError(path, f"line {number}: choices must map each of the options {row['options']} "
                                        f"to a non-empty text")
            rows[str(row["sample_id"])] = row
    return rows
