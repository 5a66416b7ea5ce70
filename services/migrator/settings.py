"""Settings of the migrator (env prefix PRISM_MIGRATOR_, or --flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared import subjects
from shared.dtypes import DtypeName
from shared.settings import WatchesHosts


class MigratorSettings(WatchesHosts):
    model_config = SettingsConfigDict(env_prefix="PRISM_MIGRATOR_", frozen=True, extra="forbid", cli_kebab_case=True)

    model: Path = Field(Path("models/demo"), description="checkpoint directory whose experts are uploaded")
    model_id: str = Field("", description="name of the model's objects in the weights store (default: dir name)")
    dtype: DtypeName = Field("float32", description="dtype of uploaded experts")
    plans_bucket: str = Field(subjects.KV_PLACEMENT, description="KV bucket of the plan (key 'plan')")
    weights_bucket: str = Field(subjects.OBJECT_WEIGHTS, description="object store bucket of expert weights")
    command_timeout_s: float = Field(60.0, gt=0, le=3600, description="wait for one host command, seconds")
    host_wait_s: float = Field(
        30.0, ge=0, le=3600, description="wait for a plan's host that is not up yet (no responders), seconds"
    )
