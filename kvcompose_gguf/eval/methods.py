"""Methods under evaluation: a name plus a factory for a llama_cpp.Llama-compatible object.

"full" is stock llama.cpp with a cache large enough for everything: the ceiling
every compressing method is measured against. The compressing methods run
`kvcompose_gguf.Llama` with one policy each, in a context of kv_budget times the
cells the full cache needs (the runner sizes it): the prompt is compressed while
it is prefilled, the way a chat is, and every method holds the same cells.
`kvpress:<press>` (kvpress_reference) are the reference methods: kvpress on transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..llama import OBSERVATION_MODES


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence.
        return str(self.args[0])


class MethodUnavailableError(RuntimeError):
    pass


@dataclass(frozen=True)
class KvUsage:
    """What the cache holds at the end of a sample, measured three ways that are never conflated.

    cells_used: physical cells that at least one layer uses (freed cells are free for new tokens);
    physical_bytes: the K and V bytes of those cells over all layers;
    logical_entries: kept (layer, KV head, slot) entries, what the attention actually reads;
    layer_slots: slots each layer keeps (equal to cells_used in a stock cache)."""

    cells_used: int
    physical_bytes: int
    logical_entries: int
    layer_slots: tuple[int, ...]


@dataclass(frozen=True)
class Method:
    """create(model_path, *, n_ctx, kv_budget, observe, logits_all, seed, n_threads) -> Llama-like.

    A method with compresses=False ignores kv_budget and observe and is run once, not per budget;
    one without observation_modes observes its own way (runs once per budget, observe None).
    question_apart: create_chat_completion takes the sample's question (question=...), so the
    method can compress the context before the question is seen (kvpress's semantics).
    details: extra fields for each sample's record."""

    name: str
    description: str
    create: Callable[..., Any]
    kv_usage: Callable[[Any], KvUsage]
    compresses: bool
    observation_modes: tuple[str, ...] = ()
    question_apart: bool = False
    details: Callable[[Any], dict] | None = None


def _factory(policy: str | None) -> Callable[..., Any]:
    """Creates `kvcompose_gguf.Llama` with `policy` (None: stock behaviour, the full cache).

    Every method gets the same llama.cpp settings (llama-cpp-python's defaults, flash
    attention off included), so rows differ only by the compression. One exception: an iSWA
    model's sliding-window cache holds its window (swa_full=False), not n_ctx cells, so that
    methods of different n_ctx (kvcompose-layers) hold the same sliding-window cache.
    """

    def create(model_path, *, n_ctx, kv_budget=None, observe=None, logits_all=False, seed=0, n_threads=None,
               **extra):
        from kvcompose_gguf.llama import Llama

        compression = {} if policy is None else {"kv_compress": policy, "kv_observe": observe or "window"}
        return Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            logits_all=logits_all,
            seed=seed,
            n_threads=n_threads,
            swa_full=False,
            verbose=False,
            **compression,
            **extra,
        )

    return create


def stock_kv_usage(llm) -> KvUsage:
    """A stock cache: one cell per evaluated token, every layer holds every cell."""
    import llama_cpp

    from kvcompose_gguf.cli import kv_bytes_allocated

    model = llm._model.model
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    cells = int(llm.n_tokens)
    bytes_per_cell = kv_bytes_allocated(llm) // llm.n_ctx()
    return KvUsage(
        cells_used=cells,
        physical_bytes=cells * bytes_per_cell,
        logical_entries=n_layer * n_head_kv * cells,
        layer_slots=(cells,) * n_layer,
    )


FULL = Method(
    name="full",
    description="stock llama.cpp, no compression, n_ctx large enough for the whole input (the ceiling)",
    create=_factory(None),
    kv_usage=stock_kv_usage,
    compresses=False,
)

def compressed_kv_usage(llm) -> KvUsage:
    """A compressed cache: cells in use, and per layer the cells it still attends to; on an
    iSWA model its sliding-window layers count the cells they hold in their own cache."""
    import llama_cpp

    stats = llm.kv_stats()
    compactor = llm._kv.compactor
    owned = compactor.cells_owned(0)
    # each cell in the layers that hold a row for it (all of them in a shared pool)
    physical = compactor.layout.cells_bytes(compactor.seq_cells(0).cells)
    swa = compactor.swa_cache(0)
    if swa is not None:  # an iSWA model's sliding-window layers: their own cache, never compressed
        owned[swa.layers] = swa.n_seq_cells
        physical += swa.n_seq_cells * swa.cell_bytes
    n_head_kv = llama_cpp.llama_model_n_head_kv(llm._model.model)
    return KvUsage(
        cells_used=stats["cells_used"],
        physical_bytes=physical,
        logical_entries=n_head_kv * int(owned.sum()),
        layer_slots=tuple(int(x) for x in owned),
    )


_COMPRESSING = {
    "kvcompose": "KVCompose: head-specific composite tokens, global per-layer budgets",
    "kvcompose-uniform": "KVCompose's composite tokens with the same count in every layer",
    "snapkv": "SnapKV: window-mean attention with pooling, per-layer equal budgets",
    "pyramidkv": "PyramidKV: SnapKV scores with budgets decreasing over layers",
    "tova": "TOVA: the last query's attention",
    "streaming": "StreamingLLM: sink + recent tokens (what llama.cpp's context shift amounts to)",
}

def memory_details(llm) -> dict:
    """The allocation the sample ran in, measured from llama.cpp's tensors."""
    stats = llm.kv_stats()
    mem, swa = stats["kv_memory"], stats["swa_cache"]
    return {"allocated_bytes": mem["allocated_bytes"], "per_layer": mem["per_layer"], "n_recent": mem["n_recent"],
            "layer_rows": mem["layer_rows"], "swa_allocated_bytes": swa["bytes"] if swa else 0}


_REGISTRY: dict[str, Method] = {FULL.name: FULL}
for _name, _description in _COMPRESSING.items():
    _REGISTRY[_name] = Method(
        name=_name,
        description=_description,
        create=_factory(_name),
        kv_usage=compressed_kv_usage,
        compresses=True,
        observation_modes=OBSERVATION_MODES,
        details=memory_details,
    )


def _per_layer_memory_factory(policy: str) -> Callable[..., Any]:
    """`policy` with per-layer physical memory in the bytes of the others' n_ctx cells: the
    full cache's cells (n_ctx / kv_budget), each layer sized from the model's profile so the
    allocation is n_ctx cells' worth of bytes (`Llama(kv_memory=...)`). Like the others it
    keeps Llama's default kv_budget per compression; the setting's kv_budget sizes memory."""
    shared_pool = _factory(policy)

    def create(model_path, *, n_ctx, kv_budget=None, **options):
        from kvcompose_gguf.layout import cache_cells

        pool = cache_cells(n_ctx)  # what the shared pool of n_ctx really allocates
        cells = cache_cells(int(n_ctx / (kv_budget or 1.0)))
        if cells <= pool:  # nothing to spread: the shared pool itself
            return shared_pool(model_path, n_ctx=n_ctx, **options)
        return shared_pool(model_path, n_ctx=cells, kv_memory=pool / cells, **options)

    return create


_REGISTRY["kvcompose-layers"] = Method(
    name="kvcompose-layers",
    description="KVCompose with per-layer physical memory: the full cache's cells, each layer's rows sized "
    "from the model's profile (`kvcompose calibrate`) to the same bytes as the others' n_ctx",
    create=_per_layer_memory_factory("kvcompose"),
    kv_usage=compressed_kv_usage,
    compresses=True,
    observation_modes=OBSERVATION_MODES,
    details=memory_details,
)

# Names that need more than a registry entry, with what to say.
_PLANNED = {
    "kvpress": "a press named after it: kvpress:full, kvpress:kvcompose, kvpress:snapkv, kvpress:pyramidkv, "
    "kvpress:tova or kvpress:streaming (the kvpress reference mode)",
}


def register(method: Method) -> None:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method


def get_method(name: str) -> Method:
    if name in _REGISTRY:
        return _REGISTRY[name]
    from . import kvpress_reference

    if kvpress_reference.is_reference(name):
        return kvpress_reference.method(name)  # needs torch and kvpress, imported on use
    if name in _PLANNED:
        raise MethodUnavailableError(
            f"method {name!r} is not available as such: it needs {_PLANNED[name]}. "
            f"Available: {', '.join(available_methods())}"
        )
    raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(available_methods())}")


def available_methods() -> list[str]:
    from . import kvpress_reference

    return sorted([*_REGISTRY, *kvpress_reference.method_names()])
