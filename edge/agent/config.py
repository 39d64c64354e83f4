"""`agent.toml`: the member daemon's settings, one model, TOML + `MIDGATE_AGENT_*` env overrides.

Example:

    data_dir = "/var/lib/midgate-agent"
    heartbeat_s = 60
    outbox_max_bytes = 268435456
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edge.sensors.config import SampleStoreConfig, SensorConfig
from protocol.settings import RoleSettings


class AgentSettings(RoleSettings):
    model_config = SettingsConfigDict(env_prefix="MIDGATE_AGENT_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path("agent-data")
    spool_dir: Path | None = Field(
        default=None, description="where the ClientApp drops contribution records; default data_dir/spool"
    )
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = Field(default=60, ge=5, le=3600)
    heartbeat_s: float = Field(default=60.0, gt=0)
    spool_poll_s: float = Field(default=0.5, gt=0)
    # A report without a receipt after this long is published again, then with exponential backoff and jitter.
    resend_after_s: float = Field(default=15.0, gt=0)
    resend_max_s: float = Field(default=600.0, gt=0)
    publish_batch: int = Field(default=200, ge=1)
    max_inflight: int = Field(default=100, ge=1, le=65535)
    outbox_max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    outbox_warn_fraction: float = Field(default=0.8, gt=0, le=1)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=120.0, gt=0)
    # `[[sensors]]` and `[sample_store]` are the sensors component's own models (edge.sensors.config).
    sensors: list[SensorConfig] = Field(default_factory=list)
    sample_store: SampleStoreConfig = Field(default_factory=SampleStoreConfig)

    @property
    def spool_root(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    def membership_dir(self, mid: str) -> Path:
        return self.data_dir / "mids" / mid
