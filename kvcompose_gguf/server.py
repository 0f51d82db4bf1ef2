"""`kvcompose serve`: llama-cpp-python's OpenAI-compatible server running the compressing `Llama`.

The routes, request types and locking are llama-cpp-python's (`llama_cpp.server`); what
changes is the model behind them. `KVModelSettings` adds the compression options to
`ModelSettings`, and `KVLlamaProxy` loads our `Llama` from them, so a conversation that
outgrows `n_ctx` is compressed and answered instead of refused.

Compression is visible in two places:

- every non-streaming completion carries an `X-KV-Stats` header (JSON), the state after
  that completion;
- `GET /kv/stats` returns the same numbers for the last finished completion (streaming
  ones included: their headers leave before the reply is generated).

Both read a snapshot that the model takes at the end of each completion, in the worker
thread that ran it: reading them never takes the server's model lock, so it never
interrupts a stream (the server cancels a stream whenever another request waits for the lock).

Needs the `server` extra: `pip install 'kvcompose-gguf[server]'`.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, Optional, Union

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from pydantic import Field, field_validator
    from starlette.datastructures import MutableHeaders
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    import llama_cpp
    from llama_cpp.server import app as server_app
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"kvcompose serve needs the server extra ({exc.name} is missing): pip install 'kvcompose-gguf[server]'"
    ) from exc

from .llama import Llama

STATS_HEADER = "X-KV-Stats"
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


class KVModelSettings(ModelSettings):
    """`ModelSettings` plus the compression keywords of `kvcompose_gguf.Llama`."""

    model: str = Field(
        default="smollm2-135m", description="GGUF path or known model name (default: smollm2-135m)."
    )
    kv_compress: Optional[str] = Field(
        default="kvcompose", description="Compression policy; 'none' for stock llama.cpp (refuses past n_ctx)."
    )
    kv_budget: Union[int, float] = Field(
        default=0.5, description="Fraction of cells kept per compression in (0, 1], or an int cell count."
    )
    kv_observe: str = Field(
        default="reread", description="Observation: reread, window, lookahead, repeat, or a task prompt."
    )
    kv_window: int = Field(default=32, ge=1, description="Observing queries in window mode.")
    kv_protect_prefix: Union[int, str] = Field(
        default="system", description="First tokens never dropped: a count, or 'system' (the leading system message)."
    )
    kv_protect_recent: int = Field(default=64, ge=1, description="Last tokens never dropped.")
    kv_memory: Optional[Union[int, float]] = Field(
        default=None,
        description="Per-layer KV memory: a fraction in (0, 1) of a full n_ctx cache, or bytes; none: the full cache.",
    )
    @field_validator("kv_protect_prefix", mode="before")
    @classmethod
    def _count_or_system(cls, value: Any) -> Any:
        # Environment variables arrive as strings: "12" is a count.
        return int(value) if isinstance(value, str) and value.isdigit() else value

    # llama-cpp-python's server defaults to logits for every token; a compressed history
    # keeps logits for the last one only.
    logits_all: bool = Field(default=False, description="Whether to return logits.")


class KVSettings(ServerSettings, KVModelSettings):
    """Server and model settings in one object (as `llama_cpp.server.settings.Settings`)."""


class ServedLlama(Llama):
    """Our `Llama`, remembering the cache statistics after each completion."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.last_kv_stats = self.full_kv_stats()

    def full_kv_stats(self) -> Dict[str, Any]:
        """`kv_stats()` plus the allocated KV bytes and what a full cache of the history would need."""
        from .cli import kv_bytes_allocated

        stats = self.kv_stats()
        allocated = kv_bytes_allocated(self)
        stats["kv_bytes_allocated"] = allocated
        stats["kv_bytes_full_cache"] = allocated // stats["n_ctx"] * stats["logical_tokens"]
        return stats

    def create_completion(self, *args: Any, **kwargs: Any):
        # Chat completions end up here too (the chat handlers call create_completion).
        result = super().create_completion(*args, **kwargs)
        if isinstance(result, dict):
            self.last_kv_stats = self.full_kv_stats()
            return result
        return self._snapshot_after(result)

    def _snapshot_after(self, chunks: Iterator) -> Iterator:
        try:
            yield from chunks
        finally:
            self.last_kv_stats = self.full_kv_stats()


# ModelSettings fields that are `Llama` keywords of the same name and meaning.
_PASSTHROUGH = (
    "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "vocab_only", "use_mmap", "use_mlock",
    "rpc_servers", "seed", "n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch",
    "rope_scaling_type", "rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor",
    "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx", "mul_mat_q", "logits_all", "embedding",
    "offload_kqv", "flash_attn", "last_n_tokens_size", "lora_base", "lora_path", "numa", "chat_format",
    "type_k", "type_v", "verbose",
)
# Settings llama-cpp-python's loader supports that this one refuses rather than ignores.
_UNSUPPORTED = {
    "clip_model_path": "multimodal chat handlers",
    "hf_model_repo_id": "downloading from the Hugging Face hub",
    "hf_pretrained_model_name_or_path": "Hugging Face tokenizers",
    "hf_tokenizer_config_path": "Hugging Face tokenizer configs",
    "draft_model": "speculative decoding",
    "chat_template_kwargs": "chat template keywords",
}


def load_llama(settings: KVModelSettings) -> ServedLlama:
    """The `ServedLlama` for these settings; ValueError for settings it cannot honour."""
    from . import models

    for name, what in _UNSUPPORTED.items():
        if getattr(settings, name):
            raise ValueError(f"{name}: {what} are not supported by kvcompose serve")
    compress = settings.kv_compress not in (None, "none")
    if compress and settings.cache:
        raise ValueError("cache: llama-cpp-python's prompt cache is not supported with kv_compress")
    kwargs: Dict[str, Any] = {name: getattr(settings, name) for name in _PASSTHROUGH}
    kwargs["kv_overrides"] = _parse_kv_overrides(settings.kv_overrides)
    if compress:
        kwargs.update(
            kv_compress=settings.kv_compress,
            kv_budget=settings.kv_budget,
            kv_observe=settings.kv_observe,
            kv_window=settings.kv_window,
            kv_protect_prefix=settings.kv_protect_prefix,
            kv_protect_recent=settings.kv_protect_recent,
            kv_memory=settings.kv_memory,
        )
    llm = ServedLlama(model_path=str(models.model_path(settings.model)), **kwargs)
    if settings.cache:
        capacity = settings.cache_size
        llm.set_cache(
            llama_cpp.LlamaDiskCache(capacity_bytes=capacity)
            if settings.cache_type == "disk"
            else llama_cpp.LlamaRAMCache(capacity_bytes=capacity)
        )
    return llm


def _parse_kv_overrides(items: Optional[list]) -> Optional[Dict[str, Union[bool, int, float, str]]]:
    """`key=type:value` strings (llama-cpp-python's format) as the `kv_overrides` dict."""
    if not items:
        return None
    parse = {"bool": lambda v: v.lower() in ("true", "1"), "int": int, "float": float, "str": str}
    overrides: Dict[str, Union[bool, int, float, str]] = {}
    for item in items:
        key, sep, typed = item.partition("=")
        kind, colon, value = typed.partition(":")
        if not sep or not colon or kind not in parse:
            raise ValueError(f"kv_overrides entry {item!r} is not key=type:value with type in {sorted(parse)}")
        overrides[key] = parse[kind](value)
    return overrides


class KVLlamaProxy(LlamaProxy):
    """llama-cpp-python's model proxy, loading `ServedLlama`s."""

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> llama_cpp.Llama:
        if not isinstance(settings, KVModelSettings):
            settings = KVModelSettings.model_validate(settings.model_dump())
        return load_llama(settings)

    def kv_stats(self) -> Optional[Dict[str, Any]]:
        """The statistics after the last finished completion of the loaded model."""
        model = self._current_model
        if model is None:
            return None
        return {"model": self._current_model_alias, **model.last_kv_stats}


class KVStatsHeader:
    """ASGI middleware: a JSON completion response gets the `X-KV-Stats` header."""

    def __init__(self, app, proxy: KVLlamaProxy):
        self.app = app
        self.proxy = proxy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith(COMPLETION_PATHS):
            return await self.app(scope, receive, send)

        async def send_with_stats(message):
            if message["type"] == "http.response.start" and message["status"] == 200:
                headers = MutableHeaders(scope=message)
                stats = self.proxy.kv_stats()
                if headers.get("content-type", "").startswith("application/json") and stats is not None:
                    headers.append(STATS_HEADER, json.dumps(stats, separators=(",", ":")))
            await send(message)

        await self.app(scope, receive, send_with_stats)


def create_app(settings: KVSettings | None = None) -> FastAPI:
    """llama-cpp-python's app (its router, middleware and locks) serving a `ServedLlama`.

    Built here rather than by `llama_cpp.server.app.create_app`, which would first load a
    stock `llama_cpp.Llama` from the same settings.
    """
    settings = settings if settings is not None else KVSettings()
    server_settings = ServerSettings(**_fields(settings, ServerSettings))
    model_settings = KVModelSettings(**_fields(settings, KVModelSettings))
    proxy = KVLlamaProxy(models=[model_settings])  # loads the model: bad settings fail here

    server_app.set_server_settings(server_settings)
    app = FastAPI(
        middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
        title="kvcompose: llama.cpp with KV cache compression",
        version=llama_cpp.__version__,
        root_path=server_settings.root_path,
    )
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
    )
    app.add_middleware(KVStatsHeader, proxy=proxy)
    app.include_router(server_app.router)
    app.include_router(_kv_router(proxy))
    # The routes read the model proxy from this module attribute (set_llama_proxy would
    # build a stock LlamaProxy); one app per process, as with llama-cpp-python's own.
    server_app._llama_proxy = proxy
    if server_settings.disable_ping_events:
        server_app.set_ping_message_factory(lambda: bytes())
    app.state.kv_proxy = proxy
    return app


def _fields(settings: KVSettings, cls) -> Dict[str, Any]:
    return {name: getattr(settings, name) for name in cls.model_fields}


def _kv_router(proxy: KVLlamaProxy) -> APIRouter:
    router = APIRouter()

    @router.get("/kv/stats", dependencies=[Depends(server_app.authenticate)], tags=["kvcompose"])
    async def kv_stats(request: Request) -> Dict[str, Any]:
        """Logical tokens, cells, compressions and KV bytes after the last finished completion."""
        return proxy.kv_stats() or {}

    return router


def serve(settings: KVSettings) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_certfile=settings.ssl_certfile,
        log_level="info" if settings.verbose else "warning",
    )
