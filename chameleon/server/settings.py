"""``chameleon serve`` settings: command-line flags override ``CHAMELEON_*`` environment
variables, which override the YAML file, which overrides the defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from retriever.engines import engine_options
from retriever.errors import InvalidInput


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHAMELEON_", extra="forbid")

    index: Path | None = Field(None, description="Passage index directory (default: built-in python-docs, built on first run).")
    wait_for_index: float = Field(
        0, ge=0, le=86400, description="Wait up to this many seconds for the index to appear (a deployment's index job may still write it)."
    )
    model: str | None = Field(None, description="Local Hugging Face model directory (default: built-in SmolLM2-135M-Instruct).")
    engine: Literal["auto", "torch", "vllm"] = Field(
        "auto",
        description="LLM engine: torch (transformers, CUDA when present) or vllm (vLLM: its own batching and prefix caching, "
        "no kNN-LM); auto is vllm on a CUDA host where it is installed (torch with --knnlm), else torch.",
    )
    decode_weights: Literal["auto", "model", "int8", "int4"] = Field(
        "auto",
        description="What the torch engine's decode steps multiply by on CPU: the model's weights, or a copy quantized to int8 per row "
        "or int4 per group of 32 (the layout of a Q4_1 GGUF's matrices, the built-in model's); fewer bytes a step, faster decoding. "
        "auto: int4 where the model's matrices are on such a grid already (nothing lost: the built-in model), else the model's.",
    )
    max_batch: int = Field(8, ge=1, le=256, description="Sequences decoded together (continuous batching); 1 is one at a time.")
    reorder_window: int = Field(
        8,
        ge=0,
        le=1024,
        description="Cache-aware admission to the batch (torch engine): a request is passed over at most this often; 0: arrival order.",
    )
    shards: int = Field(2, ge=0, le=64, description="Retrieval shards, each a node process; 0 searches in the server process.")
    replicas: int = Field(1, ge=1, le=16, description="Nodes per shard.")
    retrieval_engine: Literal["numba", "faiss", "numba-fastscan", "fpga"] = Field(
        "numba",
        description="Scan engine of the retrieval nodes (or of the server's own search with shards 0); numba-fastscan needs a 4-bit index.",
    )
    fpga_mode: Literal["hw", "emu"] | None = Field(None, description="With retrieval_engine fpga: hw (an Alveo card through PYNQ) or emu.")
    xclbin: Path | None = Field(None, description="With fpga_mode hw: the bitstream (make -C hls hw).")
    keys: Path | None = Field(None, description="CURVE keys directory (`chameleon keys gen`) to encrypt the tier.")
    state_dir: Path | None = Field(None, description="Where the tier's processes keep state and logs (default: in the cache).")
    watch_index: float = Field(
        0,
        ge=0,
        le=3600,
        description="Every this many seconds, serve the index on disk again if it changed (what POST /admin/reload does), "
        "once the retrieval tier serves the new version; 0: only when asked.",
    )
    coordinator: str | None = Field(
        None,
        description="Search a running retrieval tier through its coordinator (tcp://HOST:PORT) instead of starting one "
        "(shards and replicas are then the tier's business); it must serve the vectors of the passage index.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port.")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Bearer keys; none means open.")
    k: int = Field(4, ge=1, le=64, description="Passages per request unless the request says otherwise.")
    nprobe: int = Field(16, ge=1, le=65536)
    max_tokens: int = Field(1024, ge=1, le=4096, description="The most new tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, le=4096, description="New tokens when a request does not say.")
    max_concurrency: int = Field(16, ge=1, le=4096, description="Requests admitted at once (running or queued); more get 429.")
    access_log: bool = Field(True, description="A JSON line per request on stderr: id, route, status, time, tokens, error.")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    knnlm: Path | None = Field(None, description="kNN-LM datastore (`index build --knnlm`) for mode=knnlm (torch engine).")
    cache_policy: Literal["none", "lru", "lfu", "gdsf", "pgdsf"] = Field(
        "pgdsf",
        description="Document KV cache replacement policy (torch engine); with vllm, any but none follows vLLM's own LRU prefix cache.",
    )
    cache_device_mb: int = Field(
        512,
        ge=1,
        le=1 << 20,
        description="Device tier of the document KV cache (MiB); with vllm, only where vLLM does not report its KV cache's size.",
    )
    cache_host_mb: int = Field(2048, ge=0, le=1 << 22, description="Host tier of the document KV cache (MiB).")
    speculative: bool = Field(
        False, description="Prefill on the retrieval tier's early top-k while the search finishes (again, if the final passages differ)."
    )
    prefill_profile: Path | None = Field(None, description="Prefill profile for gdsf/pgdsf (default: measured once, cached).")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [key.strip() for key in value.split(",") if key.strip()] if isinstance(value, str) else value

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides) -> ServeSettings:
        """Settings from ``config_file`` (YAML), the environment and ``overrides`` (None = not given)."""
        from_file = {}
        if config_file is not None:
            try:
                from_file = yaml.safe_load(Path(config_file).read_text()) or {}
            except OSError as e:
                raise InvalidInput(f"cannot read the config file {config_file}: {e.strerror}") from None
            except yaml.YAMLError as e:
                raise InvalidInput(f"{config_file} is not valid YAML: {e}") from None
            if not isinstance(from_file, dict):
                raise InvalidInput(f"{config_file} must hold a mapping of settings, not {type(from_file).__name__}")
            from_file = {str(key).replace("-", "_"): value for key, value in from_file.items()}
        try:
            from_env = cls()
            values = {
                **from_file,
                **{name: getattr(from_env, name) for name in from_env.model_fields_set},
                **{name: value for name, value in overrides.items() if value is not None},
            }
            settings = cls(**values)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
            raise InvalidInput(f"invalid settings: {problems}") from None
        if "default_max_tokens" not in settings.model_fields_set:
            settings.default_max_tokens = min(settings.default_max_tokens, settings.max_tokens)
        if settings.engine == "vllm" and settings.knnlm is not None:
            raise InvalidInput(
                "kNN-LM reads the model's hidden states, which vLLM does not expose: use --engine torch (or auto) with --knnlm"
            )
        engine_options(settings.retrieval_engine, settings.fpga_mode, settings.xclbin)
        if settings.default_max_tokens > settings.max_tokens:
            raise InvalidInput(f"default_max_tokens ({settings.default_max_tokens}) exceeds max_tokens ({settings.max_tokens})")
        return settings
