from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from k2ray.billing import BUILTIN_PLANS, BillingConfig, PricePlan, format_usd, usd_to_pico


def test_builtin_plans_are_the_published_prices_in_micro_usd() -> None:
    evolink, standard, turbo = BUILTIN_PLANS["evolink"], BUILTIN_PLANS["moonshot"], BUILTIN_PLANS["moonshot-turbo"]
    assert (evolink.input_micro_usd_per_mtok, evolink.cached_input_micro_usd_per_mtok,
            evolink.output_micro_usd_per_mtok, evolink.web_search_micro_usd) == (556_000, 139_000, 2_222_000, 4_000)
    assert (standard.input_micro_usd_per_mtok, standard.cached_input_micro_usd_per_mtok,
            standard.output_micro_usd_per_mtok, standard.web_search_micro_usd) == (600_000, 150_000, 2_500_000, 5_000)
    assert (turbo.input_micro_usd_per_mtok, turbo.cached_input_micro_usd_per_mtok,
            turbo.output_micro_usd_per_mtok, turbo.web_search_micro_usd) == (1_150_000, 150_000, 8_000_000, 5_000)
    assert BillingConfig().plan(None) == ("evolink", evolink)


@pytest.mark.parametrize(("pico", "text"), [
    (0, "0"), (1, "0.000000000001"), (2_222_000, "0.000002222"), (5_000_000_000, "0.005"),
    (10**12, "1"), (123 * 10**12 + 45 * 10**10, "123.45"), (10**40 + 1, "10000000000000000000000000000.000000000001"),
])
def test_format_usd_is_exact(pico: int, text: str) -> None:
    assert format_usd(pico) == text
    assert usd_to_pico(text) == pico


def test_usd_to_pico_rejects_floats_and_rounding() -> None:
    assert usd_to_pico(Decimal("2.5")) == 2_500_000_000_000
    assert usd_to_pico(7) == 7 * 10**12
    with pytest.raises(TypeError):
        usd_to_pico(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decimals"):
        usd_to_pico("0.0000000000001")
    for bad in ("abc", "NaN", "Infinity"):
        with pytest.raises(ValueError):
            usd_to_pico(bad)


def test_plans_in_config_are_validated_and_frozen() -> None:
    custom = {"input_micro_usd_per_mtok": 1, "cached_input_micro_usd_per_mtok": 0,
              "output_micro_usd_per_mtok": 2, "web_search_micro_usd": 3}
    config = BillingConfig.model_validate({"plans": {"mine": custom}, "default_plan": "mine"})
    assert config.plan(None) == ("mine", PricePlan(**custom))
    assert config.plan("moonshot")[1] == BUILTIN_PLANS["moonshot"]
    with pytest.raises(ValueError, match="unknown price plan"):
        config.plan("nope")
    with pytest.raises(ValidationError):
        BillingConfig(default_plan="nope")
    with pytest.raises(ValidationError):
        PricePlan(**{**custom, "input_micro_usd_per_mtok": -1})
    with pytest.raises(ValidationError):
        PricePlan(**{**custom, "output_micro_usd_per_mtok": 2.5})
    with pytest.raises(ValidationError):
        config.plan(None)[1].input_micro_usd_per_mtok = 5  # type: ignore[misc]
