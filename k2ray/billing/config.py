"""`BillingConfig`: the `billing:` section of a router's config (the router's loader builds it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .keys import DEFAULT_HASH_ITERATIONS
from .prices import BUILTIN_PLANS, DEFAULT_PLAN, PricePlan
from .writer import WriterConfig

DEFAULT_LEDGER = "k2ray-ledger.db"


class BillingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ledger: str = Field(default=DEFAULT_LEDGER, description="SQLite file path/URL or postgresql://... DSN")
    default_plan: str = DEFAULT_PLAN
    plans: dict[str, PricePlan] = Field(default_factory=dict, description="added to (or replacing) built-ins")
    max_batch_records: int = Field(default=WriterConfig.max_batch_records, ge=1)
    flush_interval_s: float = Field(default=WriterConfig.flush_interval_s, gt=0)
    key_hash_iterations: int = Field(default=DEFAULT_HASH_ITERATIONS, ge=1)

    @model_validator(mode="after")
    def _known_default_plan(self) -> BillingConfig:
        if self.default_plan not in self.all_plans():
            raise ValueError(f"default_plan {self.default_plan!r} is not a plan: {sorted(self.all_plans())}")
        return self

    def all_plans(self) -> dict[str, PricePlan]:
        return {**BUILTIN_PLANS, **self.plans}

    def plan(self, name: str | None) -> tuple[str, PricePlan]:
        """The named plan (the default for None); unknown names are a ValueError."""
        name = name or self.default_plan
        plans = self.all_plans()
        if name not in plans:
            raise ValueError(f"unknown price plan {name!r}: {sorted(plans)}")
        return name, plans[name]

    def writer_config(self) -> WriterConfig:
        return WriterConfig(max_batch_records=self.max_batch_records, flush_interval_s=self.flush_interval_s)
