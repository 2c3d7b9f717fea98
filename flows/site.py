"""Where a site's data goes: one directory, outside the code.

Cohort files and their reports (your identifiers), the linkage table (the re-identification
key), staging, the delivery ledger and the default sharing directory all live under one data
directory, ``PREFECT_ORTHANC_DATA_DIR``. Relative paths in flow parameters (``cohort_file``,
``report_dir``, ``linkage_path``, ``staging_dir``, ``ledger_path``, a directory destination)
are resolved against it when a run starts, on the host that runs it; absolute paths are used as
given. Nothing resolves against the working directory, so a run started by a worker, by
``serve`` or from a shell in the checkout writes to the same place.

Default: ``$XDG_DATA_HOME/prefect-orthanc`` (``~/.local/share/prefect-orthanc``). A data
directory or a path inside the code checkout is refused (``SiteError``) unless
``PREFECT_ORTHANC_ALLOW_DATA_IN_CHECKOUT=true``, which is meant for synthetic data only (the
demo writes to ``demo-output/``). ``python -m prefect_orthanc.deployments setup`` checks and
creates it.

Layout (the shipped deployments' defaults)::

    $PREFECT_ORTHANC_DATA_DIR/
        cohorts/research.csv            the nightly cohort; research.report.csv next to it
        reports/                        criteria cohorts' reports
        linkage/linkage.csv             source <-> pseudonym (keep private)
        sharing/staging/, ledger.jsonl  ZIPs waiting for the scan, deliveries made
        shared/                         the default directory destination

Example:
    ```python
    from prefect_orthanc.flows.site import SiteSettings

    site = SiteSettings()                      # PREFECT_ORTHANC_DATA_DIR, checked
    site.path("cohorts/research.csv")          # -> /home/me/.local/share/prefect-orthanc/...
    ```
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = ["CODE_DIR", "DATA_DIR_ENV", "SiteError", "SiteSettings", "default_data_dir"]

#: the directory holding this project's code (the checkout, or site-packages when installed)
CODE_DIR = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "PREFECT_ORTHANC_DATA_DIR"
ALLOW_ENV = "PREFECT_ORTHANC_ALLOW_DATA_IN_CHECKOUT"


class SiteError(SafeMessageError, ValueError):
    """A data path is unusable; the message names the setting or parameter to change."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/prefect-orthanc``, else ``~/.local/share/prefect-orthanc``."""
    base = os.environ.get("XDG_DATA_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "prefect-orthanc"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class SiteSettings(BaseSettings):
    """``PREFECT_ORTHANC_DATA_DIR`` and how flow parameters' paths resolve against it."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_ORTHANC_", extra="ignore",
                                      frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir,
                           description="Absolute directory for cohorts, reports, linkage, "
                                       "staging, ledger and shared data; outside the code.")
    allow_data_in_checkout: bool = Field(False, description="Allow data inside the code "
                                         "checkout: synthetic data only (the demo).")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        value = value.expanduser()
        if not value.is_absolute():
            raise ValueError(f"{DATA_DIR_ENV} must be an absolute path (a relative one would "
                             f"depend on each run's working directory)")
        return Path(os.path.normpath(value))

    @model_validator(mode="after")
    def _outside_code(self) -> SiteSettings:
        self._check(self.data_dir, DATA_DIR_ENV)
        return self

    def _check(self, path: Path, what: str) -> None:
        if not self.allow_data_in_checkout and _inside(path.resolve(), CODE_DIR):
            raise ValueError(f"{what} ({path}) is inside the code checkout {CODE_DIR}: site "
                             f"data (identifiers, linkage) must live elsewhere; set "
                             f"{DATA_DIR_ENV} to a directory outside it (default "
                             f"{default_data_dir()})")

    @classmethod
    def load(cls) -> SiteSettings:
        """The settings from the environment, or ``SiteError`` saying what to fix."""
        from pydantic import ValidationError

        try:
            return cls()
        except ValidationError as error:
            raise SiteError("; ".join(e["msg"].removeprefix("Value error, ")
                                      for e in error.errors())) from None

    def path(self, value: str | Path, parameter: str = "path") -> Path:
        """``value`` made absolute: relative paths go under ``data_dir``. Raises ``SiteError``
        when the result is inside the code checkout (``parameter`` names what to change)."""
        path = Path(value).expanduser()
        path = Path(os.path.normpath(path if path.is_absolute() else self.data_dir / path))
        try:
            self._check(path, f"parameter {parameter}")
        except ValueError as error:
            raise SiteError(str(error)) from None
        return path

    def ensure(self) -> Path:
        """Create ``data_dir`` (owner-only permissions when new) and return it."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.data_dir
