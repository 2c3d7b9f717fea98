"""What a researcher asks for: a cohort file or C-FIND criteria, and when PACS traffic is allowed.

These models are the collection flow's parameters, so the Prefect UI renders them as a form.
They hold no patient identifiers: a cohort *file* may, but only its path is a parameter (the
file's format, and its one parser: ``flows.cohort_file``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefect_orthanc.flows.cohort_file import is_study_date
from prefect_orthanc.tasks.labels import LABEL_PATTERN

__all__ = ["CollectionRequest", "Criteria", "TimeWindow"]

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


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
        if not is_study_date(value):  # also refuses 20240231
            raise ValueError("dates are YYYYMMDD")
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
        if not re.fullmatch(LABEL_PATTERN, value):  # the project is a label of its studies
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
