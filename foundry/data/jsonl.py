"""JSONL records for fine-tuning and evaluation: each record with its file and line, bad lines named.

A malformed line stops the read with the file and line number, unless `skip_bad_lines` is given: then it
is skipped and counted (never silently; the caller reports `JsonlRecords.skipped`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from foundry.core.errors import UserError


@dataclass
class Record:
    """One JSON object of a JSONL file and where it came from."""

    data: dict[str, Any]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class JsonlRecords:
    """The records of a JSONL file, and the bad lines skipped (as `path:line: why`)."""

    records: list[Record]
    skipped: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def read_jsonl(path: str | Path, skip_bad_lines: bool = False,
               check: Callable[[Record], None] | None = None) -> JsonlRecords:
    """Every JSON object of a JSONL file (blank lines ignored).

    check: raises UserError for a record that parses but is wrong for the job (a missing field); such a
    record is a bad line like one that does not parse."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; give a JSONL file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); give a JSONL file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    out = JsonlRecords([])
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(data, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
            record = Record(data, str(path), number)
            if check is not None:
                check(record)
        except UserError as exc:
            if not skip_bad_lines:
                raise UserError(f"{exc} (pass --skip-bad-lines to skip such lines and count them)") from None
            out.skipped.append(str(exc))
            continue
        out.records.append(record)
    if not out.records:
        why = f"; {len(out.skipped)} bad line(s) skipped, the first: {out.skipped[0]}" if out.skipped else ""
        raise UserError(f"{path} holds no usable records{why}")
    return out
