"""`ServeArgs`: the one validated description of a Serve deployment, loaded from YAML or a dict.

The same document feeds `k2ray serve --config`, `serve run deploy/serve/local.yaml` (as the builder's
`args`) and the Helm chart. Only `load_serve_args` touches files; nothing here reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from k2ray.billing.config import BillingConfig
from k2ray.billing.prices import BUILTIN_PLANS
from k2ray.model.default_checkpoint import default_checkpoint_dir
from k2ray.serve.pd.pd_args import PDArgs
from k2ray.tools.config import ToolsConfig

# Ray Serve switches read from the replicas' environment: run user code and the handle's request router
# on the replica's main event loop instead of extra threads/loops, which saves cross-thread hops (and
# GIL hand-offs with the engine's step thread) on every streamed chunk; buffer request-path logs; keep
# the startup heap out of GC. With the gRPC engine transport (RouterArgs) and the proxy's gRPC below,
# these are Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED settings minus direct ingress. Override per pool.
REPLICA_ENV_VARS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


# Environment of the local Ray `k2ray serve` starts (its job runtime env, inherited by Serve's
# controller and HTTP proxy): the proxy forwards requests to the router and streams its chunks back
# over gRPC instead of one Ray object per chunk (about half the proxy's CPU per token), routes on its
# own event loop (no cross-loop hop per chunk: ~-25% proxy CPU), freezes the startup heap out of GC and
# buffers request-path logs, as Ray's throughput-optimized profile does.
# (Direct ingress is opt-in, `ServeArgs.direct_ingress`: one router replica only.) A cluster started
# elsewhere (`serve run` on an existing Ray) needs these in its own environment.
LOCAL_RAY_ENV_VARS = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}

# Serve's direct ingress: the ingress (router) replica runs its own HTTP server, skipping the proxy hop.
# Ray hands each ingress replica a port from a range; pinning the range to the one configured port keeps
# `host:port` what the user asked for, so it needs a single router replica and a single application.
# Released ports are reused at once (no quarantine: no external load balancer holds stale slots) and a
# stopping replica does not hold the port through Ray's 30 s load-balancer drain.
DIRECT_INGRESS_DRAINING_PERIOD_S = "0"


def direct_ingress_env_vars(port: int) -> dict[str, str]:
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # Ray's range excludes its maximum
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": DIRECT_INGRESS_DRAINING_PERIOD_S,
    }


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Args):
    """Engine knobs (passed into `EngineConfig`; None keeps the engine's default) and its replicas."""

    dtype: str = "auto"
    device: str | None = None
    block_size: int | None = Field(default=None, ge=1)
    num_kv_blocks: int | None = Field(default=None, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)
    enable_chunked_prefill: bool = True
    prefill_context_chunk: int | None = Field(default=None, ge=1)  # cached rows a prefill expands at a time
    decode_reserved_share: float | None = Field(default=None, ge=0.0, le=1.0)  # budget kept for decodes
    kernel_backend: Literal["auto", "torch", "triton"] = "auto"
    tune_host_malloc: bool = True  # glibc malloc keeps step activations on the heap (engine/host_allocator.py)
    ep_placement: str | None = None  # redundant experts: an EPLB placement JSON (k2ray.dist.eplb)
    seed: int = 0
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    torch_threads: int = Field(default=1, ge=1)
    # Tokens per streamed delta after the first (vLLM/SGLang `stream_interval`): fewer, larger messages
    # through Serve, the router and SSE for a coarser inter-chunk latency. TTFT is unaffected.
    stream_interval: int = Field(default=1, ge=1)
    # How long an engine replica waits for its engine core process to load the model and answer; a core
    # that never answers fails the replica with a clear error instead of hanging it.
    core_startup_timeout_s: float = Field(default=1800.0, gt=0.0)
    stats_interval_s: float = Field(default=1.0, gt=0.0)  # how often the replica relays its core's stats to metrics
    # CPUs the engine core process may run on (Linux sched_setaffinity); None: any. Pins pools to cores.
    cpu_affinity: list[int] | None = None
    # Custom Ray resources each replica asks for: places a pool on its own nodes (the Helm chart gives each
    # pool's worker group `k2ray_prefill` / `k2ray_decode`).
    resources: dict[str, float] = Field(default_factory=dict)
    # Serve's own queue in front of each engine replica; beyond it handles raise BackPressureError (503).
    max_ongoing_requests: int = Field(default=256, ge=1)
    max_queued_requests: int = Field(default=512, ge=1)
    env_vars: dict[str, str] = Field(default_factory=lambda: dict(REPLICA_ENV_VARS))  # replicas' environment
    # Expert parallelism: each replica is `ep_size` engine core processes (ranks, each `num_cpus` and
    # `num_gpus`, gang-scheduled as one placement group bundle per rank on one node), the routed experts
    # sharded over them; must divide the checkpoint's n_routed_experts. 1: one core per replica.
    ep_size: int = Field(default=1, ge=1)
    ep_timeout_s: float | None = Field(default=None, gt=0.0)  # joining the group, and any one collective
    # The compiled forward (k2ray/engine/runner/compiled_forward.py): CUDA-graph decode on CUDA, inductor regions on CPU;
    # None: the device's default. cuda_graph_sizes: the decode batch sizes captured (None: the engine's ladder).
    compile: bool | None = None
    cuda_graph_sizes: tuple[int, ...] | None = Field(default=None, min_length=1)


class RequestLimits(_Args):
    """Bounds on one HTTP request, checked at the edge before any tokenization (400/413 beyond them)."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1)  # 413 beyond; K2's 256K tokens fit many times
    max_json_depth: int = Field(default=64, ge=1)  # nesting of arrays and objects in the body
    max_prompts: int = Field(default=64, ge=1)  # entries of /v1/completions' `prompt` list
    max_n: int = Field(default=16, ge=1)  # choices per prompt
    # prompts x n per request; a request is also refused (400) beyond max_inflight_requests, which it
    # could never be admitted under
    max_engine_requests: int = Field(default=64, ge=1)
    # Bodies at least this large are rendered and tokenized on a thread pool instead of the event loop
    # (tiktoken releases the GIL while it encodes), so one huge prompt does not stall every stream.
    offload_min_bytes: int = Field(default=16 * 1024, ge=0)
    num_prepare_threads: int = Field(default=2, ge=1)
    # With thinking on and tools or a JSON response format, `</think>` is forced after this share of
    # max_tokens (capped by max_reasoning_tokens), so the constrained part always gets room.
    reasoning_token_share: float = Field(default=0.5, ge=0.0, le=1.0)
    max_reasoning_tokens: int | None = Field(default=None, ge=0)


class ChannelLimits(_Args):
    """What the router's delta channel listener grants a peer before it has authenticated."""

    # An engine replica sends its handshake as soon as it connects; a peer silent this long is dropped.
    handshake_timeout_s: float = Field(default=5.0, gt=0.0)
    # Connections not yet past the handshake; more are closed at once. A few engines reconnecting at the
    # same moment is the legitimate peak; from each one the router reads the 36-byte handshake, no more.
    max_pending_connections: int = Field(default=32, ge=1)


class RouterArgs(_Args):
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0.0)
    max_ongoing_requests: int = Field(default=512, ge=1)
    # Admission bound per router replica, in engine requests (a request with n choices counts n): beyond it
    # a request gets 429 + Retry-After.
    max_inflight_requests: int = Field(default=256, ge=1)
    retry_after_s: int = Field(default=1, ge=0)
    # How engine deltas reach the router. "channel": each engine replica sends one frame per engine step
    # with all of this router's deltas over a TCP connection to the router replica (requests and
    # cancellation still go through Serve). "grpc": each request is its own Serve stream of pickled
    # deltas over Serve's inter-deployment gRPC; "object_ref": Serve's default, one Ray object per delta.
    engine_transport: Literal["channel", "grpc", "object_ref"] = "channel"
    # Address the router's delta channel listens on (engines connect to it); None: the node IP Ray
    # gives the router replica (127.0.0.1 under `k2ray serve`, the pod IP on Kubernetes).
    channel_host: str | None = None
    limits: RequestLimits = RequestLimits()
    channel_limits: ChannelLimits = ChannelLimits()
    env_vars: dict[str, str] = Field(default_factory=lambda: dict(REPLICA_ENV_VARS))  # replicas' environment
    # API keys on every /v1 route (needs `billing`: keys live in its ledger); off: anyone may call.
    auth: bool = False
    # The admin API (/admin/) answers only this bearer token, inline or read from a file on the replica
    # (a mounted secret); neither set: the admin API is off (404).
    admin_token: SecretStr | None = None
    admin_token_file: str | None = None
    # A verified key is trusted this long per replica: revocation reaches other replicas within it.
    key_cache_ttl_s: float = Field(default=10.0, ge=0.0)


# Engine scheduling priorities of the built-in variants: lower is served first (vLLM's priority policy).
STANDARD_PRIORITY = 0
TURBO_PRIORITY = -1


class ServedModel(_Args):
    """One model id the router serves, with its price plan and its engine scheduling priority. Every
    variant runs on the same engine pools: a lower `priority` is admitted and scheduled first and
    preempted last (Turbo), so it is faster under load."""

    id: str = Field(min_length=1)
    # A price plan's name (k2ray/billing/prices.py's built-ins or billing.plans); None: billing.default_plan.
    plan: str | None = None
    priority: int = STANDARD_PRIORITY


DEFAULT_MODELS = (
    ServedModel(id="kimi-k2-thinking", plan="moonshot", priority=STANDARD_PRIORITY),
    ServedModel(id="kimi-k2-thinking-turbo", plan="moonshot-turbo", priority=TURBO_PRIORITY),
)


class TestingArgs(_Args):
    """Test-only switches; never enable them in production configs."""

    allow_injection: bool = False
    # With allow_injection: each chunk a prefill core sends waits this long (a slow KV network).
    kv_send_chunk_delay_s: float = Field(default=0.0, ge=0.0)


class ServeArgs(_Args):
    model: str | None = None  # checkpoint dir; None serves the embedded demo checkpoint
    # The model ids served (the first is the primary); None: `served_model_name` alone (Standard priority,
    # billing's default plan) if it is set, else DEFAULT_MODELS (Standard and Turbo).
    models: tuple[ServedModel, ...] | None = Field(default=None, min_length=1)
    served_model_name: str | None = None
    app_name: str = "k2ray"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    ray_num_cpus: int | None = Field(default=None, ge=1)  # logical CPUs of the local Ray `k2ray serve` starts
    # Ray starts workers at niceness 15; serving replicas should not yield to every other process.
    ray_worker_niceness: int = Field(default=0, ge=0, le=19)
    ray_env_vars: dict[str, str] = Field(default_factory=lambda: dict(LOCAL_RAY_ENV_VARS))
    # Console level of Ray's and Serve's own logs (their files under /tmp/ray keep everything): INFO adds a
    # line per actor start and per request.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    # HTTP served by the router replica itself on `port` (see direct_ingress_env_vars); needs one router
    # replica and this app alone on its Serve instance. Serve's proxy then listens on `proxy_port`.
    direct_ingress: bool = False
    proxy_port: int = Field(default=0, ge=0, le=65535)  # 0: any free port
    engine: EngineArgs = EngineArgs()
    # Disaggregated serving: a prefill pool and a decode pool (each `engine` updated by its own
    # section: replicas, resources, engine options) instead of one colocated engine pool.
    disaggregated: bool = False
    prefill: dict[str, Any] = Field(default_factory=dict)
    decode: dict[str, Any] = Field(default_factory=dict)
    pd: PDArgs = PDArgs()
    router: RouterArgs = RouterArgs()
    # Metering, API keys and limits (k2ray/billing); None: nothing is metered.
    billing: BillingConfig | None = None
    # Server-side tools: `tools.web_search` (provider, mode, bounds, cache) for `$web_search` (k2ray/tools).
    tools: ToolsConfig = ToolsConfig()
    testing: TestingArgs = TestingArgs()

    @model_validator(mode="after")
    def _check_direct_ingress(self) -> ServeArgs:
        if self.direct_ingress and (self.router.num_replicas != 1 or self.port == 0):
            raise ValueError("direct_ingress serves one fixed port from one router replica: "
                             "set router.num_replicas 1 and a non-zero port")
        return self

    @model_validator(mode="after")
    def _check_models(self) -> ServeArgs:
        if self.models is not None and self.served_model_name is not None:
            raise ValueError("set either models or served_model_name, not both")
        ids = [m.id for m in self.served_models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be distinct, got {ids}")
        plans = self.billing.all_plans() if self.billing is not None else BUILTIN_PLANS
        for served in self.served_models:
            if served.plan is not None and served.plan not in plans:
                raise ValueError(f"model {served.id!r}: {served.plan!r} is not a price plan: {sorted(plans)}")
        return self

    @model_validator(mode="after")
    def _check_auth(self) -> ServeArgs:
        if self.router.auth and self.billing is None:
            raise ValueError("router.auth needs a billing section: API keys live in billing.ledger")
        return self

    @model_validator(mode="after")
    def _check_pools(self) -> ServeArgs:
        self.pool_engine("prefill")  # a bad key or value in a pool section fails at load
        self.pool_engine("decode")
        if self.disaggregated and self.router.engine_transport != "channel":
            raise ValueError("disaggregated serving streams over the delta channel: router.engine_transport "
                             "must be channel")
        return self

    def pool_engine(self, pool: Literal["prefill", "decode"]) -> EngineArgs:
        """The engine args of a disaggregated pool: `engine` updated by the pool's own section."""
        overrides = self.prefill if pool == "prefill" else self.decode
        return EngineArgs.model_validate({**self.engine.model_dump(), **overrides})

    @property
    def ingress_env_vars(self) -> dict[str, str]:
        """Environment both the Serve controller and the router replicas need for direct ingress."""
        return direct_ingress_env_vars(self.port) if self.direct_ingress else {}

    @property
    def model_dir(self) -> str:
        return self.model or str(default_checkpoint_dir())

    @property
    def served_models(self) -> tuple[ServedModel, ...]:
        if self.models is not None:
            return self.models
        if self.served_model_name is not None:
            return (ServedModel(id=self.served_model_name),)
        return DEFAULT_MODELS

    @property
    def model_name(self) -> str:
        """The primary model id."""
        return self.served_models[0].id


def load_serve_args(source: str | Path | dict[str, Any] | ServeArgs | None = None, **overrides: Any) -> ServeArgs:
    """Build ServeArgs from a YAML path, a dict (Serve's builder `args`) or an instance, then apply
    top-level overrides whose value is not None (the CLI's `--model/--host/--port`)."""
    if isinstance(source, ServeArgs):
        data = source.model_dump()
    elif isinstance(source, dict):
        data = dict(source)
    elif source is None:
        data = {}
    else:
        data = yaml.safe_load(Path(source).read_text()) or {}
        # A full Serve config file is accepted too: the first application's builder args, plus the
        # file's HTTP host and port unless the args set their own.
        if "applications" in data:
            http = data.get("http_options") or {}
            app = data["applications"][0]
            data = {**{k: http[k] for k in ("host", "port") if k in http},
                    "route_prefix": app.get("route_prefix", "/"), **(app.get("args") or {})}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ServeArgs.model_validate(data)
