"""Reading data files (json, jsonl, csv, parquet, txt) into normalised examples.

Each reader yields ``(location, row, problem)`` triples, where location is what a person needs to find
the row ("line 3", "row 12"), so every error names the file and the place in it. The files are
untrusted: malformed rows are either the first error (strict) or dropped and counted (lenient).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dstune.data.formats import FORMATS, DataError, RowError, detect_format, to_example

EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
_DETECT_ROWS = 20  # rows looked at to detect the format

Row = tuple[str, Any, RowError | None]


@dataclass
class Loaded:
    """The examples of one file, and what was dropped on the way.

    Attributes:
        examples: normalised examples (``messages`` or ``text``, each with its ``source``).
        format: "text", "alpaca" or "messages", detected or given.
        dropped: reason -> number of rows dropped (lenient mode only; strict mode raises).
        path: the file read.
        rows_read: rows looked at, usable or not.
        first_dropped: reason -> location of the first row dropped for it, to go and look.
    """

    examples: list[dict]
    format: str
    dropped: dict[str, int]
    path: str
    rows_read: int = 0
    first_dropped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        """What a data report says about this file: path, format, rows read, examples, drops and where."""
        return {
            "path": self.path,
            "format": self.format,
            "rows_read": self.rows_read,
            "examples": len(self.examples),
            "dropped": dict(self.dropped),
            "first_dropped": dict(self.first_dropped),
        }


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """Yields (line number, text) for each line; text is None for a line that is not UTF-8."""
    # Split bytes on b"\n" only: str.splitlines() also splits on U+2028 and friends, which are
    # legal inside JSON strings and do occur in scraped text.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as Windows tools write
        try:
            yield number, raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            yield number, None


def _text(path: Path) -> str:
    """The whole file as text, or a DataError naming the line that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text ({exc.reason}); save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> Iterator[Row]:
    for number, text in _lines(path):
        where = f"line {number}"
        if text is None:
            yield where, None, RowError("not UTF-8", "is not UTF-8 text")
        elif text.strip():
            try:
                yield where, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield (
                    where,
                    None,
                    RowError(
                        "not valid JSON",
                        f"is not valid JSON ({exc.msg} at column "
                        f"{exc.colno}); each line must be one JSON object",
                    ),
                )


def _read_json(path: Path) -> Iterator[Row]:
    text = _text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # "Extra data" after a complete first value: an object per line in a .json file.
        first = next((line for line in text.split("\n") if line.strip()), "")
        if exc.msg == "Extra data" and _is_object(first):
            yield from _read_jsonl(path)
            return
        raise DataError(
            f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
            "expected a list of objects, or one JSON object per line"
        ) from None
    if isinstance(data, dict) and sum(1 for line in text.split("\n") if line.strip()) == 1:
        data = [data]  # a one-line file holding one object is a jsonl file with one row
    if not isinstance(data, list):
        what = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(
            f"{path}: the top level is {what}; expected a list of examples ([{{...}}, {{...}}]) "
            "or one JSON object per line"
        )
    for index, item in enumerate(data):
        yield f"row {index + 1}", item, None


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _read_csv(path: Path) -> Iterator[Row]:
    # The default limit (131,072 characters a field) is below one long document; 64 MiB is not.
    csv.field_size_limit(max(csv.field_size_limit(), 64 * 2**20))
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(
                f"{path}, line 1: no header row; the first line must name the columns "
                "(e.g. text, or instruction,input,output)"
            )
        header = [h.strip() for h in header]
        duplicates = sorted({h for h in header if header.count(h) > 1})
        if duplicates:
            raise DataError(f"{path}, line 1: the header names {duplicates} more than once")
        last = reader.line_num
        for values in reader:
            # A quoted field may span lines: report where the row starts.
            start, last = last + 1, reader.line_num
            where = f"line {start}"
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                yield (
                    where,
                    None,
                    RowError(
                        "wrong number of columns",
                        f"has {len(values)} fields, the header has {len(header)} ({', '.join(header)})",
                    ),
                )
            else:
                yield where, dict(zip(header, values)), None
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # imported here: only parquet users pay for it

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for item in batch.to_pylist():
                index += 1
                yield f"row {index}", item, None
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family for corrupt files
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None


def _read_txt(path: Path) -> Iterator[Row]:
    for number, text in _lines(path):
        where = f"line {number}"
        if text is None:
            yield where, None, RowError("not UTF-8", "is not UTF-8 text")
        elif text.strip():
            yield where, {"text": text}, None


READERS = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


def _check_input(path: Path, fmt: str) -> None:
    """Raises DataError for a missing, empty or unknown kind of file, or a format it cannot hold."""
    if path.suffix.lower() not in READERS:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; accepted: {', '.join(EXTENSIONS)}")
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"unknown data format {fmt!r}; accepted: auto, {', '.join(FORMATS)}")
    if path.suffix.lower() == ".txt" and fmt not in ("auto", "text"):
        raise DataError(
            f"{path}: a .txt file holds plain text, one example per line; data.format must be "
            f"text or auto, not {fmt}"
        )


def _choose_format(
    path: Path, fmt: str, head: list[Row], lenient: bool, text_column: str | None, label_column: str | None
) -> str:
    """The format to read the rows in: ``fmt``, or the one detected from the first rows for "auto"."""
    if fmt == "auto":
        kind = "columns" if path.suffix.lower() in (".csv", ".parquet") else "keys"
        fmt = detect_format(
            [value for _, value, problem in head if problem is None],
            str(path),
            kind,
            label_column or "label",
            text_column,
        )
    if fmt is None:
        if lenient and len(head) == _DETECT_ROWS:
            raise DataError(
                f"{path}: none of the first {len(head)} rows could be parsed; cannot tell the data format"
            )
        # Nothing parsed, so every row is bad: the loop in _add_rows raises at the first one (strict) or
        # drops them all and says so (lenient). The format is a placeholder that is never used.
        fmt = "text"
    return fmt


def _add_rows(
    loaded: Loaded,
    path: Path,
    rows: Iterator[Row],
    lenient: bool,
    max_samples: int | None,
    system: str | None,
    text_column: str | None,
    label_column: str | None,
) -> None:
    """Adds rows to ``loaded`` as examples up to ``max_samples``; a bad row raises (strict) or is counted."""
    fmt = loaded.format
    for where, value, problem in rows:
        if max_samples is not None and len(loaded.examples) >= max_samples:
            break
        loaded.rows_read += 1
        source = f"{path.name}:{where}"
        try:
            if problem is not None:
                raise problem
            loaded.examples.append(
                to_example(
                    value, fmt, source, system, text_column=text_column, label_column=label_column or "label"
                )
            )
        except RowError as err:
            if not lenient:
                raise DataError(
                    f"{path}, {where}: {err.detail} (data.format={fmt}; set data.lenient=true "
                    "to drop bad rows and count them instead)"
                ) from None
            loaded.dropped[err.reason] = loaded.dropped.get(err.reason, 0) + 1
            loaded.first_dropped.setdefault(err.reason, where)


def load_examples(
    path: str | Path,
    fmt: str = "auto",
    lenient: bool = False,
    max_samples: int | None = None,
    system: str | None = None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
) -> Loaded:
    """Reads a data file into normalised examples.

    Args:
        path: a .json (list of objects, or one object per line), .jsonl, .csv (with a header row),
            .parquet or .txt (one text example per non-empty line) file.
        fmt: "auto" (detect from the keys of the first rows), "text", "alpaca", "messages" or
            "classification".
        lenient: drop malformed rows and count them by reason instead of raising at the first one.
        max_samples: stop after this many usable examples (the first ones in the file).
        system: system prompt added to conversations that have none.
        text_column: the text column of classification rows (default: the first of text, review,
            sentence, content, comment, document that a row has).
        label_column: the label column of classification rows (default ``label``). Naming either
            column makes ``fmt="auto"`` detect classification from it.

    Returns:
        The examples with the format used and the counts of dropped rows.

    Raises:
        DataError: naming the file and the line or row: a missing or unknown file, a bad row
            (strict mode), an undetectable format, or a file with no usable rows.
    """
    path = Path(path)
    _check_input(path, fmt)
    rows = READERS[path.suffix.lower()](path)
    head = list(itertools.islice(rows, _DETECT_ROWS))
    if not head:
        raise DataError(f"{path}: the file is empty (no rows)")
    fmt = _choose_format(path, fmt, head, lenient, text_column, label_column)
    loaded = Loaded(examples=[], format=fmt, dropped={}, path=str(path))
    _add_rows(
        loaded, path, itertools.chain(head, rows), lenient, max_samples, system, text_column, label_column
    )
    if not loaded.examples:
        why = ", ".join(f"{reason}: {n}" for reason, n in loaded.dropped.items())
        raise DataError(f"{path}: no usable examples in {loaded.rows_read} rows ({why})")
    return loaded
