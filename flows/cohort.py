"""What a researcher asks for: a cohort file or C-FIND criteria, and when PACS traffic is allowed.

These models are the collection flow's parameters, so the Prefect UI renders them as a form.
They hold no patient identifiers: a cohort *file* may, but only its path is a parameter.

Cohort CSV: a header row, then one row per requested study or patient, with any of the columns
``accession_number``, ``patient_id``, ``study_instance_uid`` (at least one filled per row) and
optionally ``study_date`` (YYYYMMDD) to narrow a patient's studies. Values are read as text, so
leading zeros survive; surrounding spaces are ignored. Other columns are carried along untouched.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = [
    "KEY_COLUMNS",
    "CohortError",
    "CohortRow",
    "CollectionRequest",
    "Criteria",
    "TimeWindow",
    "read_cohort",
]

KEY_COLUMNS = ("accession_number", "patient_id", "study_instance_uid")
_DATE = re.compile(r"^\d{8}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class CohortError(SafeMessageError, ValueError):
    """The cohort cannot be used as given. Names the row or field, never the cell values."""


class CohortRow(BaseModel):
    """One cohort row as read from the file (values are the user's own identifiers)."""

    model_config = ConfigDict(frozen=True)

    index: int  # 1-based data row number (the header is row 0)
    accession_number: str = Field("", repr=False)
    patient_id: str = Field("", repr=False)
    study_instance_uid: str = Field("", repr=False)
    study_date: str = Field("", repr=False)

    def query(self) -> dict[str, str]:
        """The study-level C-FIND keys for this row (return keys asked for empty)."""
        keys = {"AccessionNumber": self.accession_number, "PatientID": self.patient_id,
                "StudyInstanceUID": self.study_instance_uid, "StudyDate": self.study_date}
        return {name: value for name, value in keys.items() if value}


def _date(value: str) -> dt.date:
    # A DICOM DA is a calendar date: no zone to attach, the UTC below only makes that explicit.
    return dt.datetime.strptime(value, "%Y%m%d").replace(tzinfo=dt.UTC).date()


class Criteria(BaseModel):
    """C-FIND criteria for a criteria cohort (no patient identifiers here)."""

    model_config = ConfigDict(extra="forbid")

    modalities: list[str] = Field(default_factory=list,
                                  description="Modalities in study, e.g. CT, MR (empty = any).")
    date_from: str = Field("", description="First study date, YYYYMMDD.")
    date_to: str = Field("", description="Last study date, YYYYMMDD (inclusive).")
    last_days: int = Field(0, ge=0, le=36500, description="Or: studies of the last N days, "
                           "today included, counted when the run starts (for scheduled sweeps).")
    study_description: str = Field("", description="Study description, wildcards * and ? allowed.")

    @field_validator("date_from", "date_to")
    @classmethod
    def _check_date(cls, value: str) -> str:
        value = value.strip().replace("-", "")
        if not value:
            return value
        if not _DATE.match(value):
            raise ValueError("dates are YYYYMMDD")
        _date(value)  # raises on 20240231
        return value

    @field_validator("modalities")
    @classmethod
    def _check_modalities(cls, value: list[str]) -> list[str]:
        cleaned = [v.strip().upper() for v in value if v.strip()]
        if any(not re.fullmatch(r"[A-Z]{2,4}", v) for v in cleaned):
            raise ValueError("modalities are DICOM codes such as CT, MR, US")
        return cleaned

    @model_validator(mode="after")
    def _check_range(self) -> Criteria:
        if bool(self.last_days) == bool(self.date_from or self.date_to):
            raise ValueError("give either date_from and date_to, or last_days")
        if not self.last_days and not (self.date_from and self.date_to):
            raise ValueError("give both date_from and date_to")
        if self.date_from > self.date_to:
            raise ValueError("date_from is after date_to")
        return self

    def dates(self, today: dt.date | None = None) -> tuple[str, str]:
        """The study date range to query: the fixed one, or the last ``last_days`` days."""
        if not self.last_days:
            return self.date_from, self.date_to
        today = today or dt.datetime.now().astimezone().date()  # the worker's local date
        first = today - dt.timedelta(days=self.last_days - 1)
        return first.strftime("%Y%m%d"), today.strftime("%Y%m%d")

    def query(self, date_from: str | None = None, date_to: str | None = None) -> dict[str, str]:
        default_from, default_to = self.dates()
        query = {"StudyDate": f"{date_from or default_from}-{date_to or default_to}"}
        if self.modalities:
            query["ModalitiesInStudy"] = "\\".join(self.modalities)
        if self.study_description:
            query["StudyDescription"] = self.study_description
        return query


class TimeWindow(BaseModel):
    """Hours during which PACS transfers are allowed, e.g. 19:00-07:00 Europe/Brussels."""

    model_config = ConfigDict(extra="forbid")

    start: str = Field("19:00", description="Window opens, HH:MM local time.")
    end: str = Field("07:00", description="Window closes, HH:MM (may be past midnight).")
    timezone: str = Field(description="IANA time zone of start and end, e.g. Europe/Brussels "
                                      "or UTC (required: hours mean nothing without it).")
    outside: Literal["wait", "stop"] = Field(
        "stop", description="Outside the window: wait for it to open, or stop cleanly (a re-run "
                            "continues).")
    max_wait_hours: float = Field(16, gt=0, le=24, description="Longest wait when "
                                  "outside='wait', in hours.")

    @model_validator(mode="after")
    def _not_empty(self) -> TimeWindow:
        if self.start == self.end:
            raise ValueError("the window opens and closes at the same time: it would never "
                             "be open (leave time_window empty to allow any time)")
        return self

    @field_validator("start", "end")
    @classmethod
    def _check_time(cls, value: str) -> str:
        if not _HHMM.match(value.strip()):
            raise ValueError("times are HH:MM, 24-hour")
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone (use an IANA name such as Europe/Paris)") from None
        return value

    def _bounds(self) -> tuple[dt.time, dt.time]:
        return (dt.time.fromisoformat(self.start), dt.time.fromisoformat(self.end))

    def is_open(self, now: dt.datetime) -> bool:
        local = now.astimezone(ZoneInfo(self.timezone)).time()
        start, end = self._bounds()
        if start <= end:
            return start <= local < end
        return local >= start or local < end  # the window spans midnight

    def seconds_until_open(self, now: dt.datetime) -> float:
        if self.is_open(now):
            return 0.0
        zone = ZoneInfo(self.timezone)
        local = now.astimezone(zone)
        start, _ = self._bounds()
        opening = local.replace(hour=start.hour, minute=start.minute, second=0, microsecond=0)
        if opening <= local:
            opening += dt.timedelta(days=1)
        return (opening - local).total_seconds()


class CollectionRequest(BaseModel):
    """Everything the research collection flow needs, in the order a user decides it: what to
    collect (a cohort file or criteria, the project), from where, when, then tuning.

    The collection flow takes these as flat parameters (a run's override of one keeps the
    deployment's others) and builds this model when it starts, so a bad combination fails
    before the PACS is touched. Paths are relative to ``PREFECT_ORTHANC_DATA_DIR``
    (``flows.site``) unless absolute.
    """

    model_config = ConfigDict(extra="forbid")

    cohort_file: str | None = Field(None, description="What to collect: a cohort CSV (columns "
                                    "accession_number, patient_id, study_instance_uid, "
                                    "study_date), relative to PREFECT_ORTHANC_DATA_DIR unless "
                                    "absolute. Either this or criteria.")
    criteria: Criteria | None = Field(None, description="Or: C-FIND criteria (modalities, "
                                      "study dates, description) instead of a file.")
    project: str = Field("research", description="Project recorded on the collected studies; "
                         "the sharing flow selects studies by it.")
    source_modality: str = Field("pacs", description="The PACS, as a DICOM modality name "
                                                     "configured in the research Orthanc.")
    time_window: TimeWindow | None = Field(None, description="Only move studies inside these "
                                           "hours (empty: any time).")
    concurrency: int = Field(4, ge=1, le=32, description="Studies retrieved at once by this "
                             "run (the PACS's global limit still applies across runs).")
    dry_run: bool = Field(False, description="Plan only: resolve the cohort, move nothing.")
    find_cap: int = Field(0, ge=0, description="Result cap of the PACS's C-FIND (0 = unknown: "
                          "a criteria query is split whenever it returns exactly this many).")
    job_timeout: float = Field(3600, gt=0, description="Longest wait for one study's C-MOVE, "
                               "in seconds.")
    report_dir: str = Field("reports", description="Where a criteria cohort's CSV report goes, "
                            "relative to PREFECT_ORTHANC_DATA_DIR unless absolute (a file "
                            "cohort's report goes next to the file).")

    @field_validator("project")
    @classmethod
    def _check_project(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
            raise ValueError("project is 1-64 letters, digits, '-' or '_'")
        return value

    @field_validator("cohort_file")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        if value is not None and not value.strip().lower().endswith((".csv", ".txt", ".tsv")):
            raise ValueError("cohort_file is a CSV file (.csv, .tsv or .txt)")
        return value.strip() if value else value

    @field_validator("source_modality")
    @classmethod
    def _check_modality(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("source_modality names the PACS (a DICOM modality of the "
                             "research Orthanc)")
        return value.strip()

    @model_validator(mode="after")
    def _one_source(self) -> CollectionRequest:
        if (self.cohort_file is None) == (self.criteria is None):
            raise ValueError("give exactly one of cohort_file and criteria")
        return self


def read_cohort(path: str | Path) -> list[CohortRow]:
    """Read and check a cohort CSV; every problem is reported at once, by row and column."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"cohort file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CohortError(f"{path.name}: not UTF-8 text (save the sheet as CSV UTF-8)") from None
    sample = text[:4096]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(text.splitlines(), dialect)
    header = next(reader, None)
    if not header:
        raise CohortError(f"{path.name}: empty file, expected a header row")
    columns = [h.strip().lower().replace(" ", "_") for h in header]
    if not set(columns) & set(KEY_COLUMNS):
        raise CohortError(f"{path.name}: header has none of the columns {', '.join(KEY_COLUMNS)}")
    if len(set(columns)) != len(columns):
        raise CohortError(f"{path.name}: duplicate column names in the header")
    problems: list[str] = []
    rows: list[CohortRow] = []
    for number, cells in enumerate(reader, start=1):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(columns):
            problems.append(f"row {number}: {len(cells)} cells, header has {len(columns)}")
            continue
        values = {c: v.strip() for c, v in zip(columns, cells, strict=True)
                  if c in (*KEY_COLUMNS, "study_date")}
        if not any(values.get(c) for c in KEY_COLUMNS):
            problems.append(f"row {number}: no accession_number, patient_id or "
                            f"study_instance_uid")
            continue
        uid = values.get("study_instance_uid", "")
        if uid and (not _UID.match(uid) or len(uid) > 64):
            problems.append(f"row {number}: study_instance_uid is not a DICOM UID")
        date = values.get("study_date", "")
        if date:
            try:
                if not _DATE.match(date):
                    raise ValueError
                _date(date)
            except ValueError:
                problems.append(f"row {number}: study_date is not YYYYMMDD")
        if any(ch in v for v in values.values() for ch in "*?\\"):
            problems.append(f"row {number}: wildcards and backslashes are not allowed")
        rows.append(CohortRow(index=number, **values))
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more"
                                            if len(problems) > 20 else "")
        raise CohortError(f"{path.name}: {len(problems)} problem(s): {shown}")
    if not rows:
        raise CohortError(f"{path.name}: no data rows")
    return rows
