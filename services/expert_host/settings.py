"""Settings of one expert host (env prefix PRISM_HOST_, or --flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared import subjects
from shared.dtypes import DtypeName
from shared.settings import Computes


class ExpertHostSettings(Computes):
    model_config = SettingsConfigDict(env_prefix="PRISM_HOST_", frozen=True, extra="forbid", cli_kebab_case=True)

    host: str = Field("host0", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="unique host name")
    node: str = Field("node0", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="node (edge server) of this host")
    model: Path = Field(Path("models/demo"), description="checkpoint directory the experts are read from")
    model_id: str = Field("", description="name of the model's objects in the weights store (default: dir name)")
    weights_bucket: str = Field(subjects.OBJECT_WEIGHTS, description="object store bucket of expert weights")
    experts: str = Field("*:*", description="experts to hold: LAYERS:EXPERTS items, e.g. '1-3:0-7,5:*'")
    memory_limit_mb: float = Field(4096.0, gt=0, le=2**24, description="memory budget for expert weights, MiB")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device of the experts")
    speed: float = Field(1.0, gt=0, le=1000, description="relative compute speed (placement input), 1.0 = reference")
    dtype: DtypeName = Field("float32", description="expert weight dtype")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60, description="status heartbeat period, seconds")
    busy_poll_s: float = Field(
        0.002, ge=0, le=1, description="keep polling this long after a message instead of sleeping (0: off), seconds"
    )
    load_concurrency: int = Field(
        4, ge=1, le=64, description="experts fetched from the weights store at once while loading"
    )
    max_pending: int = Field(
        64, ge=1, le=100_000, description="messages from the bus in flight at once; beyond, 'overloaded'"
    )
