"""The cohort file: the one parser of a cohort CSV, for reading it and for writing its report.

A cohort file is made by a person, usually in a spreadsheet: a header row, then one row per
requested study or patient, with any of the columns ``accession_number``, ``patient_id``,
``study_instance_uid`` (at least one filled per row) and optionally ``study_date``
(YYYYMMDD) to narrow a patient's studies. Column names ignore case and punctuation
(spaces, ``_``, ``-``, ``.``, ``#``), and the names hospital exports use are accepted
(``COLUMN_ALIASES``, the one table): ``Accession``, ``Accession No``, ``Acc#``,
``AccessionNumber`` (the DICOM keyword) all name ``accession_number``; ``MRN``,
``Patient ID``, ``Medical Record Number`` name ``patient_id``; ``Study UID``,
``StudyInstanceUID`` name ``study_instance_uid``; ``Study Date``, ``Exam Date`` name
``study_date``. Values are read as text, so leading zeros survive; surrounding spaces are
ignored.

Other columns are carried along untouched and unread (``CohortFile.extra_columns``; the flows
log their names), unless a name *looks like an identifier* (``looks_like_identifier``: a word
``id``, ``no``, ``nr``, ``num``, ``number``, ``acc``, ``key``, ``date``, ``dob``, ``pat``, ``pid``,
``exam`` or ``mrn``, or the text ``accession``, ``patient``, ``study``, ``uid``, ``mrn`` or
``record`` anywhere, as in ``Order ID``, ``PatientName``, ``Study Description``): an
identifier column silently unread would widen the query (a patient's every study instead of
one accession), so the file is refused, naming the column and the accepted names. A column
whose name starts with ``note`` or ``comment`` (``Note: old MRN``) is always an unread extra.

What spreadsheets and exports produce is read as the person sees it:

- UTF-8 with or without a byte-order mark, or UTF-16 with one (Excel's "Unicode Text");
- ``,``, ``;``, tab or ``|`` between cells, whichever splits the header into known columns
  (or the one an Excel ``sep=;`` first line declares); CRLF, LF or CR line ends;
- quoted cells, with delimiters, doubled quotes or line breaks inside;
- blank lines (also ``;;;``), lines starting with ``#`` and lines before the header anywhere:
  kept as they are, never read as rows;
- empty columns after the named ones (Excel exports its used range).

A row is identified by its **line number in the file** (the first line is 1), as a text
editor or a spreadsheet shows it: errors name lines, and the report
(``CohortFile.write_report``) is the file itself, line for line, in the file's own encoding,
delimiter and line ends, with result columns added to the header and to every row.

Example:
    ```python
    cohort = CohortFile.read("cohorts/lung.csv")
    [row.index for row in cohort.rows]  # e.g. [2, 3, 5]: line 4 was blank
    ```
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import datetime as dt
import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydicom.datadict import dictionary_VR
from pydicom.uid import RE_VALID_UID
from pydicom.valuerep import MAX_VALUE_LEN

from prefect_orthanc.flows.site import DATA_DIR_ENV, SiteSettings
from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = ["COLUMN_ALIASES", "KEY_COLUMNS", "CohortError", "CohortFile", "CohortRow",
           "is_study_date", "looks_like_identifier", "read_cohort", "resolve_cohort_file",
           "study_date"]

KEY_COLUMNS = ("accession_number", "patient_id", "study_instance_uid")
_COLUMNS = (*KEY_COLUMNS, "study_date")
#: every accepted header name of each column, compared with case and punctuation removed
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "accession_number": ("accession_number", "Accession", "Accession No", "Accession Nr",
                         "Accession Num", "Accession #", "Acc", "Acc No", "Acc Nr", "Acc Num",
                         "Acc Number", "Acc#", "Accession ID"),
    "patient_id": ("patient_id", "MRN", "Patient MRN", "Patient No", "Patient Number",
                   "Medical Record Number", "Medical Record No", "MR Number", "MR No"),
    "study_instance_uid": ("study_instance_uid", "Study UID", "Study IUID", "Study Instance UID"),
    "study_date": ("study_date", "Exam Date", "Date of Study", "Study Date (YYYYMMDD)"),
}
#: words (whole, or camelCase parts) that make a column name look like an identifier
_SUSPECT_WORDS = frozenset({"id", "ids", "no", "nr", "num", "number", "acc", "key", "date",
                            "dob", "pat", "pid", "exam", "mrn"})
#: texts that do anywhere in the name (glued names: "patientname", "accessionnumber")
_SUSPECT_TEXT = ("accession", "patient", "study", "studie", "uid", "mrn", "record")
_NOTE_PREFIXES = ("note", "comment")
_DELIMITERS = (",", ";", "\t", "|")
_DATE = re.compile(r"^\d{8}$")
#: how spreadsheets show a long number they took an identifier for: 8.00E+15, 1,23E+12
_SPREADSHEET_NUMBER = re.compile(r"^\d+([.,]\d+)?E\+\d+$", re.IGNORECASE)
#: lines before the header (titles, notes) looked through for it
_PREAMBLE_LINES = 20
_SHOWN_PROBLEMS = 20


class CohortError(SafeMessageError, ValueError):
    """The cohort cannot be used as given. Names the line or column, never the cell values."""


class CohortRow(BaseModel):
    """One cohort row as read from the file (values are the user's own identifiers)."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="The row's identity: its line number in the cohort file "
                                   "(the first line is 1), as an editor or spreadsheet shows it.")
    accession_number: str = Field("", repr=False)
    patient_id: str = Field("", repr=False)
    study_instance_uid: str = Field("", repr=False)
    study_date: str = Field("", repr=False)

    def query(self) -> dict[str, str]:
        """The study-level C-FIND keys for this row (return keys asked for empty)."""
        keys = {"AccessionNumber": self.accession_number, "PatientID": self.patient_id,
                "StudyInstanceUID": self.study_instance_uid, "StudyDate": self.study_date}
        return {name: value for name, value in keys.items() if value}


Kind = Literal["preamble", "header", "row", "blank", "comment"]


@dataclasses.dataclass(frozen=True)
class Record:
    """One record of the file as read: its first line, what it is, its text (without the final
    line break) and, for the header and rows, its cells (a row's padded to the header's)."""

    line: int
    kind: Kind
    text: str
    cells: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CohortFile:
    """A cohort file as read: its dialect, every record in order, and its checked rows."""

    path: Path
    encoding: str  # "utf-8", "utf-8-sig" (a BOM) or "utf-16"
    delimiter: str
    line_terminator: str
    records: tuple[Record, ...]
    rows: tuple[CohortRow, ...]

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """The names of the header's columns that are carried along unread (names only)."""
        header = next(r for r in self.records if r.kind == "header")
        return tuple(cell.strip() for cell in header.cells if cell.strip() and not _name(cell))

    @classmethod
    def read(cls, path: str | Path) -> CohortFile:
        """Read and check a cohort file; ``CohortError`` lists every problem at once, by line
        and column (never a cell's value)."""
        path = Path(path)
        if not path.is_file():
            where = "" if path.is_absolute() else f" (relative to the working directory " \
                                                  f"{Path.cwd()})"
            raise CohortError(f"cohort file not found: {path}{where}")
        encoding, text = _decode(path)
        delimiter, terminator, header_at, records = _records(path.name, text)
        header = records[header_at]
        columns = _column_names(path.name, header)
        named = max(i for i, c in enumerate(header.cells) if c.strip()) + 1  # Excel pads
        problems: list[str] = []
        rows: list[CohortRow] = []
        kept: list[Record] = [*records[:header_at], header]
        for record in records[header_at + 1:]:
            if record.kind != "row":
                kept.append(record)
                continue
            cells = record.cells
            if len(cells) < named or any(c.strip() for c in cells[len(columns):]):
                problems.append(f"line {record.line}: {len(cells)} cells, the header has "
                                f"{named} (a missing or extra delimiter?)")
                continue
            cells = cells[:len(columns)] + ("",) * (len(columns) - len(cells))
            kept.append(dataclasses.replace(record, cells=cells))
            values = {c: v.strip() for c, v in zip(columns, cells, strict=True) if c}
            problem = _check_row(values)
            if problem:
                problems.append(f"line {record.line}: {problem}")
            else:
                rows.append(CohortRow(index=record.line, **values))
        if problems:
            more = len(problems) - _SHOWN_PROBLEMS
            shown = "; ".join(problems[:_SHOWN_PROBLEMS]) + (f"; and {more} more" if more > 0
                                                              else "")
            raise CohortError(f"{path.name}: {len(problems)} problem(s): {shown}")
        if not rows:
            raise CohortError(f"{path.name}: no data rows after the header (line "
                              f"{header.line})")
        return cls(path=path, encoding=encoding, delimiter=delimiter,
                   line_terminator=terminator, records=tuple(kept),
                   rows=tuple(rows))

    def write_report(self, target: Path, columns: Sequence[str],
                     results: Mapping[int, Sequence[object]]) -> Path:
        """Write this file to ``target`` line for line, in its own encoding, delimiter and line
        ends, with ``columns`` added to the header and ``results[row.index]`` to each row
        (empty cells for a row without one); blank, comment and preamble lines are copied as
        they are. Written to a temporary name, then renamed: never half a report."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        with tmp.open("w", encoding=self.encoding, newline="") as handle:
            writer = csv.writer(handle, delimiter=self.delimiter, quotechar='"',
                                lineterminator=self.line_terminator,
                                quoting=csv.QUOTE_MINIMAL)
            for record in self.records:
                if record.kind == "header":
                    writer.writerow([*record.cells, *columns])
                elif record.kind == "row":
                    extra = results.get(record.line, [""] * len(columns))
                    writer.writerow([*record.cells, *extra])
                else:
                    handle.write(record.text + self.line_terminator)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(target)
        return target


def resolve_cohort_file(value: str | Path, given_as: str = "the cohort_file parameter"
                        ) -> Path:
    """The cohort file ``value`` names, as the flows find it: a relative path under
    ``PREFECT_ORTHANC_DATA_DIR`` (``flows.site``), never the working directory; an absolute
    one as given.

    Raises:
        CohortError: No file there; names the path looked at, and what it was relative to.
        SiteError: The data directory or the path is unusable (inside the code).
    """
    site = SiteSettings.load()
    path = site.path(value, "cohort_file")
    if not path.is_file():
        where = ("" if Path(value).expanduser().is_absolute() else
                 f" (relative to {DATA_DIR_ENV}={site.data_dir})")
        raise CohortError(f"cohort file not found: {path}: put the cohort there or set "
                          f"{given_as}{where}")
    return path


def read_cohort(path: str | Path) -> list[CohortRow]:
    """The checked rows of a cohort file; a relative ``path`` is under
    ``PREFECT_ORTHANC_DATA_DIR``, as the flows' ``cohort_file`` (``resolve_cohort_file``).

    Raises:
        CohortError: No such file (naming where it looked), or a malformed one
            (``CohortFile.read``: every bad line and column named, never a cell).
        SiteError: The data directory is unusable.

    Example:
        ```python
        rows = read_cohort("cohorts/lung.csv")  # $PREFECT_ORTHANC_DATA_DIR/cohorts/lung.csv
        rows[0].index, rows[0].query()  # its line number, its C-FIND keys
        ```
    """
    return list(CohortFile.read(resolve_cohort_file(path, "another path")).rows)


def _decode(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif data.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"
    else:
        encoding = "utf-8"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        raise CohortError(f"{path.name}: not UTF-8 text (save the sheet as \"CSV UTF-8\")")
    return encoding, text


def _line_terminator(lines: Sequence[str]) -> str:
    for line in lines:
        for ending in ("\r\n", "\n", "\r"):
            if line.endswith(ending):
                return ending
    return "\n"


def _cells(line: str, delimiter: str) -> tuple[str, ...]:
    """The cells of one physical line."""
    return tuple(next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter), []))


def _squash(name: str) -> str:
    return re.sub(r"[\W_]", "", name).lower()


_CANONICAL = {_squash(alias): column for column, aliases in COLUMN_ALIASES.items()
              for alias in aliases}


def _name(cell: str) -> str:
    return _CANONICAL.get(_squash(cell), "")


def looks_like_identifier(name: str) -> bool:
    """Whether a column ``name`` we do not read looks like it names an identifier or a date
    (so reading the file without it would widen the query). Names starting with ``note`` or
    ``comment`` never do.

    Example:
        ```python
        looks_like_identifier("Order ID"), looks_like_identifier("site")  # True, False
        ```
    """
    squashed = _squash(name)
    if not squashed or squashed.startswith(_NOTE_PREFIXES):
        return False
    words = {w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)}
    return bool(words & _SUSPECT_WORDS) or any(text in squashed for text in _SUSPECT_TEXT)


def _accepted() -> str:
    return "; ".join(f"{column}: {', '.join(aliases[1:])}"
                     for column, aliases in COLUMN_ALIASES.items())


def _known(cells: Sequence[str]) -> int:
    return sum(bool(_name(c)) for c in cells)


def _kind(line: str, delimiter: str) -> Kind:
    """What a record starting with this physical line is, before its cells are read."""
    if line.lstrip().startswith("#"):
        return "comment"
    if not re.sub(r'[\s"]', "", line.replace(delimiter, "")):
        return "blank"  # also ";;;": a blank spreadsheet row
    return "row"


def _header(lines: Sequence[str]) -> tuple[str, int]:
    """The delimiter and the header's index in ``lines``: the first line (after blank,
    comment and title lines, and an Excel ``sep=;`` first line) that some delimiter splits into
    at least one known column; ties go to more cells."""
    declared = None
    looked = 0
    for index, line in enumerate(lines):
        if index == 0 and re.fullmatch(r"sep=.", line.strip()):
            declared = line.strip()[-1]
            continue
        if _kind(line, declared or ",") != "row":
            continue
        candidates = (declared,) if declared else _DELIMITERS
        best = max(candidates, key=lambda d: (_known(_cells(line, d)), len(_cells(line, d))))
        if _known(_cells(line, best)):
            return best, index
        looked += 1
        if looked >= _PREAMBLE_LINES:
            break
    raise ValueError("no header row with any of the columns " + ", ".join(KEY_COLUMNS)
                     + " (names ignore case and punctuation; also accepted: " + _accepted()
                     + ")")


def _records(filename: str, text: str) -> tuple[str, str, int, list[Record]]:
    """The delimiter, the line terminator, the header's position in the records, and every
    record in order: lines before the header as "preamble" (or blank/comment), then the header,
    then rows (csv-parsed, so a quoted cell may span lines), blank lines and comments."""
    lines = list(io.StringIO(text, newline=""))
    if not text.strip():
        raise CohortError(f"{filename}: empty file, expected a header row")
    try:
        delimiter, header_index = _header(lines)
    except ValueError as error:
        raise CohortError(f"{filename}: {error}") from None
    records = [Record(i + 1, "preamble" if _kind(line, delimiter) == "row" else
                      _kind(line, delimiter), line.rstrip("\r\n"))
               for i, line in enumerate(lines[:header_index])]
    header = lines[header_index]
    try:  # strictly, as the rows: an unclosed quote is not repaired into a column name
        next(csv.reader([header.rstrip("\r\n")], delimiter=delimiter, strict=True))
    except csv.Error:
        raise CohortError(f"{filename}: line {header_index + 1} (the header): a quote opened "
                          f"there is never closed, or text follows a closing quote (quote "
                          f"whole names, or none)") from None
    records.append(Record(header_index + 1, "header", header.rstrip("\r\n"),
                          _cells(header, delimiter)))
    position = header_index + 1

    def feed() -> Iterator[str]:  # hands lines to the csv reader only when it asks for one
        nonlocal position
        while position < len(lines):
            position += 1
            yield lines[position - 1]

    reader = csv.reader(feed(), delimiter=delimiter, strict=True)  # no row swallowed silently
    while position < len(lines):
        first = position
        kind = _kind(lines[first], delimiter)
        if kind != "row":
            position += 1
            records.append(Record(first + 1, kind, lines[first].rstrip("\r\n")))
            continue
        try:
            cells = tuple(next(reader))
        except csv.Error:
            raise CohortError(f"{filename}: line {first + 1}: a quote opened there is never "
                              f"closed, or text follows a closing quote (quote whole cells, "
                              f"doubling the quotes inside)") from None
        records.append(Record(first + 1, "row", "".join(lines[first:position]).rstrip("\r\n"),
                              cells))
    return delimiter, _line_terminator(lines), header_index, records


def _column_names(filename: str, header: Record) -> list[str]:
    """The known column of each header cell ("" for the others); ``CohortError`` when a
    known column is named twice, or another column looks like an identifier."""
    columns = [_name(cell) for cell in header.cells]
    suspect = [cell.strip() for cell, column in zip(header.cells, columns, strict=True)
               if not column and looks_like_identifier(cell)]
    if suspect:  # column names are not PHI; unread, they would widen the query
        raise CohortError(
            f"{filename}: the header (line {header.line}) has column(s) "
            f"{', '.join(repr(c) for c in suspect)} that look like identifiers but are not "
            f"read: rename each to an accepted name ({', '.join(_COLUMNS)}; also {_accepted()}),"
            f" remove it, or start its name with 'note' to keep it unread")
    twice = sorted({c for c in columns if c and columns.count(c) > 1})
    if twice:
        raise CohortError(f"{filename}: the header (line {header.line}) names "
                          f"{', '.join(twice)} more than once")
    return columns


#: identifier columns whose values are bounded by their DICOM attribute's VR
_KEYWORDS = {"accession_number": "AccessionNumber", "patient_id": "PatientID"}


def _check_row(values: Mapping[str, str]) -> str:
    """What is wrong with a row's values (never the values themselves), or ""."""
    if not any(values.get(c) for c in KEY_COLUMNS):
        return "no accession_number, patient_id or study_instance_uid"
    problems = []
    uid = values.get("study_instance_uid", "")
    # pydicom's rule, not UID(uid).is_valid: that warns and logs the value
    if uid and not (len(uid) <= 64 and RE_VALID_UID.match(uid)):
        problems.append("study_instance_uid is not a DICOM UID")
    for column, keyword in _KEYWORDS.items():  # SH 16, LO 64 (pydicom's dictionary)
        vr = dictionary_VR(keyword)
        value = values.get(column, "")
        if len(value) > MAX_VALUE_LEN[vr]:
            problems.append(f"{column} is longer than a DICOM {keyword} can be "
                            f"({vr}: {MAX_VALUE_LEN[vr]} characters)")
        if any(ord(ch) < 32 and ch != "\x1b" for ch in value):
            problems.append(f"{column} holds control characters")
    date = values.get("study_date", "")
    if date and not is_study_date(date):
        problems.append("study_date is not YYYYMMDD")
    if any(ch in v for v in values.values() for ch in "*?\\"):
        problems.append("wildcards and backslashes are not allowed")
    rewritten = [c for c in KEY_COLUMNS if _SPREADSHEET_NUMBER.match(values.get(c, ""))]
    if rewritten:  # 8001234567890123 shown as 8.00E+15: the identifier is lost
        problems.append(f"{', '.join(rewritten)} is a number a spreadsheet rewrote (like "
                        f"8.00E+15): format the column as Text and export again")
    return ", ".join(problems)


def study_date(value: str) -> dt.date:
    """The calendar date of a DICOM DA value, YYYYMMDD (a DA has no time zone).

    Raises:
        ValueError: not eight digits, or no such day (20240231).
    """
    if not _DATE.match(value):
        raise ValueError("not a DICOM DA date (YYYYMMDD)")
    return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))


def is_study_date(value: str) -> bool:
    """Whether ``value`` is a DICOM DA date, YYYYMMDD, that exists (not 20240231)."""
    try:
        study_date(value)
    except ValueError:
        return False
    return True
