"""`ToolsConfig`: the `tools:` section of a deployment's config; `tools.web_search` configures `$web_search`."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MAX_RESULTS = 5
MAX_MAX_RESULTS = 20  # SearXNG's first result page holds about 20
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_ROUNDS = 3
DEFAULT_CACHE_MAX_ENTRIES = 1024
DEFAULT_CACHE_TTL_S = 600.0
DEFAULT_MAX_QUERY_CHARS = 400
DEFAULT_MAX_RESULT_CHARS = 1_500
DEFAULT_MAX_TOOL_RESULT_CHARS = 8_000
DEFAULT_MAX_RESPONSE_BYTES = 2 * 1024 * 1024


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearxngConfig(_Config):
    base_url: str | None = Field(default=None, description="e.g. http://searxng:8080; only this host is queried")
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1)
    language: str | None = Field(default=None, description="SearXNG `language` parameter, e.g. en")
    safesearch: Literal[0, 1, 2] | None = None

    @field_validator("base_url")
    @classmethod
    def _http_base_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"searxng.base_url must be http(s)://host[:port][/path], got {url!r}")
        return url.rstrip("/")


class LocalIndexConfig(_Config):
    index_path: str | None = Field(default=None, description="`k2ray search-index` output; None: the embedded index")
    snippet_tokens: int = Field(default=32, ge=1, le=64, description="FTS5 snippet() length in tokens")


class AnthropicResultConfig(_Config):
    """How results become Anthropic `web_search_result` blocks. `encrypted_content` is opaque to clients and
    must come back to us in later turns, so it carries the text the model saw (base64url JSON, not secret)."""

    include_page_age: bool = True
    encrypted_content: Literal["text", "empty"] = "text"


class WebSearchConfig(_Config):
    provider: Literal["local", "searxng"] = "local"
    # moonshot: the call ends the response (finish_reason tool_calls), the client echoes it, the next request
    # runs the search; server: the router runs up to max_rounds searches inside one request.
    mode: Literal["moonshot", "server"] = "moonshot"
    max_results: int = Field(default=DEFAULT_MAX_RESULTS, ge=1, le=MAX_MAX_RESULTS)
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    max_rounds: int = Field(default=DEFAULT_MAX_ROUNDS, ge=1)
    max_query_chars: int = Field(default=DEFAULT_MAX_QUERY_CHARS, ge=1)
    max_result_chars: int = Field(default=DEFAULT_MAX_RESULT_CHARS, ge=1, description="per result, in tool text")
    max_tool_result_chars: int = Field(default=DEFAULT_MAX_TOOL_RESULT_CHARS, ge=1, description="whole tool text")
    cache_max_entries: int = Field(default=DEFAULT_CACHE_MAX_ENTRIES, ge=0, description="0 disables the cache")
    cache_ttl_s: float = Field(default=DEFAULT_CACHE_TTL_S, gt=0)
    searxng: SearxngConfig = SearxngConfig()
    local: LocalIndexConfig = LocalIndexConfig()
    anthropic: AnthropicResultConfig = AnthropicResultConfig()

    @model_validator(mode="after")
    def _provider_is_configured(self) -> WebSearchConfig:
        if self.provider == "searxng" and self.searxng.base_url is None:
            raise ValueError("tools.web_search.provider searxng needs tools.web_search.searxng.base_url")
        return self


class ToolsConfig(_Config):
    web_search: WebSearchConfig = WebSearchConfig()
