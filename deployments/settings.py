"""``DeploymentSettings``: the ``PREFECT_ORTHANC_*`` settings that ``setup`` and ``serve`` read
(the work pool, the PACS limits, the block names, serving's polling and heartbeats)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DeploymentSettings"]


class DeploymentSettings(BaseSettings):
    """``PREFECT_ORTHANC_*`` settings of ``setup`` and ``serve`` (names match prefect.yaml)."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_ORTHANC_", extra="ignore")

    work_pool: str = Field("orthanc-process", description="Process work pool for `prefect "
                                                          "deploy` deployments.")
    modality_limits: str = Field("pacs=2", description="Concurrent C-FIND/C-MOVE allowed per "
                                                       "PACS, e.g. 'pacs=2,archive=1'.")
    credentials_block: str = Field("research", description="OrthancCredentials block name.")
    secret_block: str = Field("deid-secret", description="Secret block with the de-id secret.")
    serve_poll_seconds: float = Field(2.0, gt=0, le=60, description="How often `serve` looks "
                                      "for runs to start (new-study latency).")
    ownership_check_seconds: float = Field(5.0, gt=0, le=300, description="How often `serve` "
                                           "checks that `prefect deploy` has not given its "
                                           "deployments to a work pool meanwhile.")
    heartbeat_seconds: int = Field(30, ge=30, le=3600, description="Flow run heartbeat "
                                   "interval of served runs (PREFECT_FLOWS_HEARTBEAT_"
                                   "FREQUENCY; prefect.yaml sets the same for workers).")
    zombie_seconds: float = Field(90.0, ge=60, description="A flow run without heartbeat "
                                  "this long is marked Crashed by the automation `setup` "
                                  "makes (at least 2 heartbeats).")

    @model_validator(mode="after")
    def _zombie_after_two_heartbeats(self) -> DeploymentSettings:
        if self.zombie_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("PREFECT_ORTHANC_ZOMBIE_SECONDS must be at least twice "
                             "PREFECT_ORTHANC_HEARTBEAT_SECONDS (one late heartbeat is no "
                             "crash)")
        return self

    @field_validator("modality_limits")
    @classmethod
    def _check_limits(cls, value: str) -> str:
        cls.parse_limits(value)
        return value

    @staticmethod
    def parse_limits(value: str) -> dict[str, int]:
        limits: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, _, number = item.partition("=")
            if not name.strip() or not number.strip().isdigit() or int(number) < 1:
                raise ValueError("modality limits are NAME=N[,NAME=N] with N >= 1")
            limits[name.strip()] = int(number)
        return limits

    @property
    def limits(self) -> dict[str, int]:
        return self.parse_limits(self.modality_limits)
