"""Readers for the file formats the datasets were published in, each record tagged with where it came from.

A reader yields `RawRecord`s (the record's fields under their original names) or, for a record it could not read,
a `DataFormatError` in its place, so the caller decides between stopping and skipping, and a skipped record costs
only itself: bytes that are not UTF-8, a NUL byte, an oversized CSV field or JSON nested too deeply spoil their
record, not the file. A file that cannot be read at all (wrong format, a missing CSV column, broken XML, a JSON
array that stops parsing) raises the error instead, and `SkipLog` counts it as a dropped file, not a record.
"""

from __future__ import annotations

import csv
import io
import json
import re
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
    """Skipped bad records per source (`counts`: each one a record that would otherwise have been read), files
    dropped whole after a file-level error (`files`: their remaining records are not counted, since they could not
    be read), and the first few messages, for the manifest."""

    keep_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, source: str, error: DataFormatError) -> None:
        self.counts[source] = self.counts.get(source, 0) + 1
        self._keep(source, str(error))

    def add_file(self, source: str, error: DataFormatError) -> None:
        self.files[source] = self.files.get(source, 0) + 1
        self._keep(source, f"{error} (the rest of the file was dropped)")

    def _keep(self, source: str, message: str) -> None:
        kept = self.examples.setdefault(source, [])
        if len(kept) < self.keep_examples:
            kept.append(message)

    def to_json(self) -> dict:
        return {
            name: {
                "count": self.counts.get(name, 0),
                **({"files_dropped": self.files[name]} if name in self.files else {}),
                "first": self.examples[name],
            }
            for name in sorted(self.examples)
        }


def read_json_records(path: Path, shown: str) -> Iterator[ReadResult]:
    """JSON Lines, or one JSON array of objects; both are used by the published datasets (often under `.json`)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        yield from _json_array_records(text, shown)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        location = Location(shown, number)
        if _UNDECODABLE.search(line):
            yield DataFormatError(location, NOT_UTF8)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield DataFormatError(location, f"not valid JSON ({error.msg} at column {error.colno})")
            continue
        except RecursionError:
            yield DataFormatError(location, TOO_DEEP)
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
        start = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataFormatError(
                Location(shown, error.lineno), f"not a valid JSON array ({error.msg})"
            ) from None
        except RecursionError:  # where the element ends is unknown, so the array cannot go on
            raise DataFormatError(location, f"not a valid JSON array ({TOO_DEEP})") from None
        if _UNDECODABLE.search(text, start, position):
            yield DataFormatError(location, NOT_UTF8)
        else:
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
    consumed = 0  # lines the CSV reader has taken: where the next record starts, and proof of progress

    def lines():
        nonlocal consumed
        for line in io.StringIO(_read_text(path), newline=""):
            consumed += 1
            yield line

    reader = csv.DictReader(lines())
    try:
        header = reader.fieldnames or []
    except csv.Error as error:
        raise DataFormatError(Location(shown, 1), f"malformed CSV header ({error})") from None
    for column in columns:
        if column not in header:
            raise DataFormatError(Location(shown, 1), f"missing CSV column (header: {header})", column)
    while True:
        first_line = consumed + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # e.g. a field over csv.field_size_limit(): the reader goes on after it
            if consumed < first_line:  # it took no line: the rest cannot be read
                raise DataFormatError(Location(shown, first_line), f"malformed CSV ({error})") from None
            yield DataFormatError(Location(shown, first_line), f"malformed CSV ({error})")
            continue
        location = Location(shown, first_line)
        if None in row or any(value is None for value in row.values()):
            yield DataFormatError(location, f"expected {len(header)} CSV fields")
        elif bad := next((name for name, value in row.items() if "\x00" in value), None):
            yield DataFormatError(location, "a NUL byte in a CSV field", bad)
        elif bad := next((name for name, value in row.items() if _UNDECODABLE.search(value)), None):
            yield DataFormatError(location, NOT_UTF8, bad)
        else:
            yield RawRecord(location, row)


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
    lines = {name: _read_text(path).splitlines() for name, path in paths.items()}
    counts = {name: len(values) for name, values in lines.items()}
    if len(set(counts.values())) > 1:
        shortest = min(counts, key=counts.get)
        raise DataFormatError(
            Location(shown[shortest], counts[shortest] + 1),
            f"parallel files differ in length: {', '.join(f'{shown[n]} has {c} lines' for n, c in counts.items())}",
        )
    first = next(iter(paths))
    for index, values in enumerate(zip(*lines.values(), strict=True)):
        location = Location(shown[first], index + 1)
        if any(_UNDECODABLE.search(value) for value in values):
            yield DataFormatError(location, NOT_UTF8)
        else:
            yield RawRecord(location, dict(zip(lines, values, strict=True)))


NOT_UTF8 = "not UTF-8 text"
TOO_DEEP = "nested too deeply to read"
# Bytes that are not UTF-8, as `surrogateescape` decoding leaves them: each spoils only the record it is in.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="surrogateescape")
