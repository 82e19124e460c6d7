"""Readers for the file formats the datasets were published in, each record tagged with where it came from.

A reader yields `RawRecord`s (the record's fields under their original names) or, for a record it could not read,
a `DataFormatError` in its place, so the caller decides between stopping and skipping. A file that cannot be read
at all (wrong format, a missing CSV column, broken XML) raises the error instead.
"""

from __future__ import annotations

import csv
import io
import json
import xml.sax
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Location:
    """Where a record lives: a file (shown relative to the source folder) or a hub dataset, and a line or row."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


class DataFormatError(ValueError):
    """Bad input, with the file, the line and (when one field is at fault) the field."""

    def __init__(self, location: Location, message: str, field: str | None = None):
        self.location = location
        self.field = field
        self.message = message
        where = f"{location}: field '{field}'" if field else str(location)
        super().__init__(f"{where}: {message}")


class FieldError(ValueError):
    """Raised by record parsers, which do not know the location; the loader attaches it."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"field '{field}': {message}")


@dataclass(frozen=True)
class RawRecord:
    location: Location
    data: dict


ReadResult = RawRecord | DataFormatError


@dataclass
class SkipLog:
    """Counts of skipped bad records per source, with the first few messages, for the manifest."""

    keep_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, source: str, error: DataFormatError) -> None:
        self.counts[source] = self.counts.get(source, 0) + 1
        kept = self.examples.setdefault(source, [])
        if len(kept) < self.keep_examples:
            kept.append(str(error))

    def to_json(self) -> dict:
        return {name: {"count": n, "first": self.examples[name]} for name, n in sorted(self.counts.items())}


def read_json_records(path: Path, shown: str) -> Iterator[ReadResult]:
    """JSON Lines, or one JSON array of objects; both are used by the published datasets (often under `.json`)."""
    text = _read_text(path, shown)
    if text.lstrip().startswith("["):
        yield from _json_array_records(text, shown)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        location = Location(shown, number)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield DataFormatError(location, f"not valid JSON ({error.msg} at column {error.colno})")
            continue
        yield _as_record(location, value)


def _json_array_records(text: str, shown: str) -> Iterator[ReadResult]:
    # Decoding element by element keeps each record's line number, which json.loads of the whole array loses.
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == "]":
            return
        location = Location(shown, text.count("\n", 0, position) + 1)
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataFormatError(
                Location(shown, error.lineno), f"not a valid JSON array ({error.msg})"
            ) from None
        yield _as_record(location, value)
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            raise DataFormatError(location, "not a valid JSON array (expected ',' or ']')")


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _as_record(location: Location, value: object) -> ReadResult:
    if not isinstance(value, dict):
        return DataFormatError(location, f"expected a JSON object, got {type(value).__name__}")
    return RawRecord(location, value)


def read_csv_records(path: Path, shown: str, columns: tuple[str, ...]) -> Iterator[ReadResult]:
    """A CSV file with a header row that must name every one of `columns`."""
    text = _read_text(path, shown)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    for column in columns:
        if column not in header:
            raise DataFormatError(Location(shown, 1), f"missing CSV column (header: {header})", column)
    try:
        for row in reader:
            location = Location(shown, reader.line_num)
            if None in row or any(value is None for value in row.values()):
                yield DataFormatError(location, f"expected {len(header)} CSV fields")
                continue
            yield RawRecord(location, row)
    except csv.Error as error:
        raise DataFormatError(Location(shown, reader.line_num), f"malformed CSV ({error})") from None


def read_xml_elements(path: Path, shown: str, element: str) -> Iterator[ReadResult]:
    """Every `element` in an XML file as a record: its attributes plus the text of each child element."""
    handler = _ElementCollector(element)
    try:
        xml.sax.parseString(path.read_bytes(), handler)
    except xml.sax.SAXParseException as error:
        raise DataFormatError(
            Location(shown, error.getLineNumber()), f"not well-formed XML ({error.getMessage()})"
        ) from None
    for line, data in handler.records:
        yield RawRecord(Location(shown, line), data)


class _ElementCollector(xml.sax.ContentHandler):
    def __init__(self, element: str):
        super().__init__()
        self.element = element
        self.records: list[tuple[int, dict]] = []
        self._current: dict | None = None
        self._child: str | None = None
        self._text: list[str] = []

    def startElement(self, name, attrs):
        if name == self.element:
            self._current = dict(attrs)
            self.records.append((self._locator.getLineNumber(), self._current))
        elif self._current is not None:
            self._child, self._text = name, []

    def characters(self, content):
        if self._child is not None:
            self._text.append(content)

    def endElement(self, name):
        if name == self.element:
            self._current = None
        elif self._current is not None and name == self._child:
            self._current[name] = "".join(self._text)
            self._child = None


def read_parallel_lines(paths: dict[str, Path], shown: dict[str, str]) -> Iterator[ReadResult]:
    """Line i of each file together is record i (CodeXGLUE's buggy/fixed pairs); the files must be equally long."""
    lines = {name: _read_text(path, shown[name]).splitlines() for name, path in paths.items()}
    counts = {name: len(values) for name, values in lines.items()}
    if len(set(counts.values())) > 1:
        shortest = min(counts, key=counts.get)
        raise DataFormatError(
            Location(shown[shortest], counts[shortest] + 1),
            f"parallel files differ in length: {', '.join(f'{shown[n]} has {c} lines' for n, c in counts.items())}",
        )
    first = next(iter(paths))
    for index, values in enumerate(zip(*lines.values(), strict=True)):
        yield RawRecord(Location(shown[first], index + 1), dict(zip(lines, values, strict=True)))


def _read_text(path: Path, shown: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataFormatError(Location(shown, line), "not UTF-8 text") from None
