from __future__ import annotations

import pydantic
import pytest

from k2ray.tools import ToolsConfig, WebSearchConfig


def test_defaults_are_the_embedded_local_index_in_moonshot_mode():
    config = ToolsConfig().web_search
    assert (config.provider, config.mode, config.local.index_path) == ("local", "moonshot", None)
    with pytest.raises(pydantic.ValidationError):
        config.max_results = 3  # frozen


def test_searxng_needs_an_http_base_url():
    with pytest.raises(pydantic.ValidationError, match="base_url"):
        WebSearchConfig(provider="searxng")
    for bad in ("ftp://host", "http://", "http://host/?q=x", "searxng:8080"):
        with pytest.raises(pydantic.ValidationError, match="base_url"):
            WebSearchConfig(provider="searxng", searxng={"base_url": bad})
    config = WebSearchConfig(provider="searxng", mode="server", searxng={"base_url": "http://searx:8080/sx/"})
    assert config.searxng.base_url == "http://searx:8080/sx"


@pytest.mark.parametrize("field", ["max_results", "timeout_s", "max_rounds", "cache_ttl_s"])
def test_non_positive_bounds_are_refused(field):
    with pytest.raises(pydantic.ValidationError, match=field):
        WebSearchConfig(**{field: 0})


def test_unknown_fields_are_refused():
    with pytest.raises(pydantic.ValidationError, match="providr"):
        ToolsConfig.model_validate({"web_search": {"providr": "local"}})


def test_serve_args_carry_the_tools_section():
    from k2ray.serve.args import load_serve_args

    args = load_serve_args({"tools": {"web_search": {"provider": "searxng", "mode": "server", "max_rounds": 2,
                                                     "searxng": {"base_url": "http://127.0.0.1:8888"}}}})
    assert (args.tools.web_search.provider, args.tools.web_search.max_rounds) == ("searxng", 2)
    assert load_serve_args({}).tools == ToolsConfig()
    with pytest.raises(pydantic.ValidationError, match="base_url"):
        load_serve_args({"tools": {"web_search": {"provider": "searxng"}}})
