"""Price plans and exact money.

Prices are integers: micro-USD per 1M tokens and micro-USD per search. A token at `p` micro-USD per 1M
costs exactly `p` pico-USD (1e-12 USD), so every amount the ledger stores is an integer number of
pico-USD and no float ever touches money.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation, localcontext
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, Field

PICO_PER_USD = 10**12
PICO_PER_MICRO = 10**6
USD_DECIMALS = 12
MAX_USD_DIGITS = 64


class PricePlan(BaseModel):
    """One plan's rates: micro-USD per 1M tokens per token meter, micro-USD per web search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_micro_usd_per_mtok: int = Field(ge=0, description="uncached prompt tokens")
    cached_input_micro_usd_per_mtok: int = Field(ge=0, description="prompt tokens served from the prefix cache")
    output_micro_usd_per_mtok: int = Field(ge=0, description="completion tokens, reasoning included")
    web_search_micro_usd: int = Field(ge=0, description="per search run")


DEFAULT_PLAN = "evolink"

BUILTIN_PLANS: MappingProxyType[str, PricePlan] = MappingProxyType({
    # The seed's price list: $0.556 / $0.139 (cache hit) / $2.222 per 1M tokens, $0.004 per search.
    "evolink": PricePlan(input_micro_usd_per_mtok=556_000, cached_input_micro_usd_per_mtok=139_000,
                         output_micro_usd_per_mtok=2_222_000, web_search_micro_usd=4_000),
    # platform.moonshot.ai: kimi-k2-thinking $0.60 / $0.15 / $2.50, turbo $1.15 / $0.15 / $8.00; $0.005/search.
    "moonshot": PricePlan(input_micro_usd_per_mtok=600_000, cached_input_micro_usd_per_mtok=150_000,
                          output_micro_usd_per_mtok=2_500_000, web_search_micro_usd=5_000),
    "moonshot-turbo": PricePlan(input_micro_usd_per_mtok=1_150_000, cached_input_micro_usd_per_mtok=150_000,
                                output_micro_usd_per_mtok=8_000_000, web_search_micro_usd=5_000),
})


def format_usd(pico_usd: int) -> str:
    """Exact decimal string of a pico-USD amount, no exponent, no trailing zeros: 5_000_000_000 -> '0.005'."""
    sign = "-" if pico_usd < 0 else ""
    whole, frac = divmod(abs(pico_usd), PICO_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:0{USD_DECIMALS}d}".rstrip("0")


def usd_to_pico(usd: str | int | Decimal) -> int:
    """Parse a USD amount ('12.5', Decimal, int) exactly; more than 12 decimals is an error, not a rounding."""
    if isinstance(usd, float):
        raise TypeError("money is never a float: pass a string or a Decimal")
    try:
        amount = Decimal(usd)
    except InvalidOperation as e:
        raise ValueError(f"not a USD amount: {usd!r}") from e
    if not amount.is_finite():
        raise ValueError(f"not a USD amount: {usd!r}")
    with localcontext() as ctx:
        ctx.prec = MAX_USD_DIGITS  # scaleb rounds to the context's precision: make room for any budget
        pico = amount.scaleb(USD_DECIMALS)
    if pico != pico.to_integral_value():
        raise ValueError(f"{usd!r} has more than {USD_DECIMALS} decimals")
    return int(pico)
