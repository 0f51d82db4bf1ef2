"""The kvpress reference: the authors' presses on the same samples, through transformers.

Methods `kvpress:<press>` (`kvpress:full` is no press) run kvpress 0.5.5 on CPU torch
with the model's own GGUF weights (`AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name)`), the way kvpress's pipeline does: the context is prefilled and
compressed once, then the question is decoded and the answer generated greedily.
Budgets follow the project's convention: compression_ratio = 1 - kv_budget.

What is the same as the llama.cpp methods: the samples, the system prompt, the chat
template and the token ids (the prompt is formatted and tokenized by llama.cpp's
vocabulary, then split where the task's context ends). What differs:

- weights: the GGUF holds Q4_1 blocks; transformers dequantizes them to float32 and
  computes in float32, where llama.cpp multiplies the quantized blocks (and keeps an
  f16 KV cache). Replies can differ slightly even without compression (compare
  `full` with `kvpress:full`);
- memory: a transformers cache holds one tensor per layer, so per-layer budgets are
  physical there. `physical_bytes` is what those float32 tensors hold (twice an f16
  cache); `cells_used` is the widest layer, what a llama.cpp cache would need;
- the question is decoded one token at a time. It is the same computation as one
  forward pass, but after KVCompose the layers hold different lengths, and
  transformers 5.2 sizes the causal mask of a multi-token step from layer 0, which
  fails; single-token steps need no mask.

Only models whose every layer attends to the whole context are accepted: kvpress's
KVComposePress allocates one global budget over layers that all hold the whole
context, which Gemma-3's sliding-window layers do not.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .methods import KvUsage, Method, MethodUnavailableError, UnknownMethodError

PREFIX = "kvpress:"
# our name -> kvpress press class (None: no press, the reference's full cache)
PRESSES = {
    "full": None,
    "kvcompose": "KVComposePress",
    "snapkv": "SnapKVPress",
    "pyramidkv": "PyramidKVPress",
    "tova": "TOVAPress",
    "streaming": "StreamingLLMPress",
}
SUPPORTED_ARCHITECTURES = ("llama",)
INSTALL_HINT = "pip install -e '.[reference]' (CPU torch, kvpress==0.5.5, transformers)"


def is_reference(name: str) -> bool:
    return name.startswith(PREFIX)


def method_names() -> list[str]:
    return [PREFIX + p for p in PRESSES]


def check_available() -> None:
    """MethodUnavailableError naming the install command when torch, transformers or kvpress is missing."""
    missing = []
    for module in ("torch", "transformers", "kvpress"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MethodUnavailableError(
            f"the kvpress reference methods need {', '.join(missing)}: {INSTALL_HINT}"
        )


def gguf_architecture(model_path: str | Path) -> tuple[str, dict[str, Any]]:
    """(general.architecture, the other scalar metadata) of a GGUF file, read without loading weights."""
    import gguf

    reader = gguf.GGUFReader(str(model_path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if len(field.data) != 1:
            continue
        part = field.parts[field.data[0]]
        try:
            meta[key] = bytes(part).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else part[0].item()
        except (UnicodeDecodeError, IndexError, AttributeError):
            continue
    return str(meta.get("general.architecture", "")), meta


def check_model(model_path: str | Path) -> None:
    """Refuse models the reference cannot run faithfully, saying why."""
    arch, meta = gguf_architecture(model_path)
    name = Path(model_path).name
    if arch.startswith("gemma"):
        window = meta.get(f"{arch}.attention.sliding_window")
        raise MethodUnavailableError(
            f"the kvpress reference refuses {name} ({arch}): kvpress's KVComposePress gives every layer a "
            "share of one global budget on the assumption that every layer holds the whole context, but "
            f"Gemma-3's sliding-window layers hold only the last {window or 'few'} tokens (and kvpress "
            "compresses only its global layers), so the comparison would not be like for like. "
            "Use SmolLM2 (the default model)"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MethodUnavailableError(
            f"the kvpress reference runs {', '.join(SUPPORTED_ARCHITECTURES)} models (SmolLM2), not {arch!r} ({name})"
        )


_HF_MODELS: dict[str, Any] = {}


def hf_model(model_path: str | Path):
    """transformers' model on the GGUF's weights (dequantized to float32), loaded once per process."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    key = str(Path(model_path).resolve())
    if key not in _HF_MODELS:
        path = Path(key)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # the GGUF loader's own progress bar writes to stderr; the harness has its own
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        model.eval()
        _HF_MODELS.clear()  # one model at a time: they are hundreds of MiB in float32
        _HF_MODELS[key] = model
    return _HF_MODELS[key]


def make_press(press: str, compression_ratio: float):
    """A kvpress press by our name, at kvpress's compression_ratio (= 1 - kv_budget)."""
    import kvpress

    logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVComposePress warns on every use
    class_name = PRESSES[press]
    return None if class_name is None else getattr(kvpress, class_name)(compression_ratio=compression_ratio)


def _captured_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt tokens llama-cpp-python's chat handler builds for `messages` (the model's
    template, its BOS rule, special tokens parsed), without running a completion."""
    from kvcompose_gguf.llama import SystemPrompt

    tokens = SystemPrompt(tokenizer)._prompt(messages)
    if tokens is None:
        raise RuntimeError("the chat handler did not produce a prompt")
    return tokens


def split_prompt(tokenizer, messages: list[dict], question: str) -> tuple[list[int], list[int]]:
    """(context tokens, question tokens) of the chat prompt for `messages`, whose last user
    message ends with `question`: the context is what kvpress compresses, the question with
    the rest of the template (end of turn, assistant header) comes after.

    Both come from the one tokenization llama.cpp sees; the split is the common prefix with
    the prompt whose last message stops where the question begins.
    """
    last = messages[-1]
    if last.get("role") != "user" or not last["content"].endswith(question):
        raise ValueError("the last message must be the user's, ending with the question")
    whole = _captured_prompt(tokenizer, messages)
    without = messages[:-1] + [{"role": "user", "content": last["content"][: -len(question)].rstrip()}]
    shortened = _captured_prompt(tokenizer, without)
    k = 0
    for a, b in zip(whole, shortened):
        if a != b:
            break
        k += 1
    if k == 0 or k == len(whole):
        raise ValueError("could not find where the context ends in the prompt")
    return whole[:k], whole[k:]


class ReferenceModel:
    """A `Llama`-like object running one kvpress press: `create_chat_completion` (with the
    question named, so that the context can be compressed before it), `reset`, `close`."""

    def __init__(self, model_path, press: str, kv_budget: float | None, n_threads: int | None = None):
        import llama_cpp
        import torch

        self.press_name = press
        self.compression_ratio = None if PRESSES[press] is None else round(1.0 - float(kv_budget), 6)
        # One thread unless told: on a shared CPU, torch's OpenMP threads spin waiting for each
        # other (a decode step took 15x longer with 2 threads than with 1 on a loaded 2-core machine).
        torch.set_num_threads(int(n_threads) if n_threads else 1)
        self.model = hf_model(model_path)
        self.tokenizer = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        self._vocab = llama_cpp.llama_model_get_vocab(self.tokenizer._model.model)
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.cache = None
        self.context_tokens = 0
        self.compressed_layer_counts: list[int] | None = None
        self.n_tokens = 0

    def reset(self) -> None:
        self.cache = None
        self.context_tokens = 0
        self.compressed_layer_counts = None
        self.n_tokens = 0

    def close(self) -> None:
        self.cache = None
        self.tokenizer.close()

    def create_chat_completion(self, messages, *, question: str, temperature: float = 0.0, max_tokens: int = 32,
                               **_ignored):
        if temperature != 0.0:
            raise ValueError("the kvpress reference decodes greedily (temperature 0)")
        context, prompt_rest = split_prompt(self.tokenizer, list(messages), question)
        reply = self.answer(context, prompt_rest, max_tokens)
        text = self.tokenizer.detokenize(reply).decode("utf-8", errors="ignore")
        return {
            "choices": [{"message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": len(context) + len(prompt_rest), "completion_tokens": len(reply)},
        }

    def compress_context(self, context: list[int]):
        """Prefill `context` under the press (kvpress compresses as the prefill ends); returns the cache."""
        import torch
        from transformers import DynamicCache

        press = None if self.compression_ratio is None else make_press(self.press_name, self.compression_ratio)
        cache = DynamicCache()
        ids = torch.tensor([context], dtype=torch.long)
        with torch.inference_mode(), (press(self.model) if press is not None else contextlib.nullcontext()):
            self.model.model(input_ids=ids, past_key_values=cache)
        self.cache = cache
        self.context_tokens = len(context)
        self.compressed_layer_counts = self.layer_lengths()
        return cache

    def answer(self, context: list[int], prompt_rest: list[int], max_tokens: int) -> list[int]:
        """Greedy reply after the compressed context; positions continue from the context's length."""
        import torch

        self.compress_context(context)
        position = len(context)
        reply: list[int] = []
        logits = None
        with torch.inference_mode():
            for token in prompt_rest:
                logits = self._step(token, position)
                position += 1
            while len(reply) < max_tokens:
                token = int(torch.argmax(logits))
                if self._is_eog(self._vocab, token):
                    break
                reply.append(token)
                logits = self._step(token, position)
                position += 1
        self.n_tokens = position
        return reply

    def _step(self, token: int, position: int):
        import torch

        out = self.model(
            input_ids=torch.tensor([[token]], dtype=torch.long),
            past_key_values=self.cache,
            position_ids=torch.tensor([[position]], dtype=torch.long),
            logits_to_keep=1,
        )
        return out.logits[0, -1]

    def next_token_logits(self, context: list[int], prompt_rest: list[int]) -> np.ndarray:
        """Logits after the whole prompt (for tests against llama.cpp's)."""
        import torch

        self.compress_context(context)
        with torch.inference_mode():
            for i, token in enumerate(prompt_rest):
                logits = self._step(token, len(context) + i)
        return logits.float().numpy()

    def layer_lengths(self) -> list[int]:
        return [int(layer.keys.shape[-2]) for layer in self.cache.layers]


def reference_kv_usage(llm: ReferenceModel) -> KvUsage:
    """What the transformers cache holds: one tensor per layer, so per-layer budgets are physical."""
    lengths = llm.layer_lengths()
    n_head_kv = int(llm.cache.layers[0].keys.shape[1])
    physical = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in llm.cache.layers
    )
    return KvUsage(
        cells_used=max(lengths),
        physical_bytes=int(physical),
        logical_entries=n_head_kv * sum(lengths),
        layer_slots=tuple(lengths),
    )


def _details(llm: ReferenceModel) -> dict:
    return {
        "n_ctx": None,  # transformers' cache grows as needed
        "kv_dtype": str(llm.cache.layers[0].keys.dtype).replace("torch.", ""),
        "context_tokens": llm.context_tokens,
        "compressed_layer_counts": llm.compressed_layer_counts,
    }


def _factory(press: str):
    def create(model_path, *, n_ctx=None, kv_budget=None, observe=None, logits_all=False, seed=0, n_threads=None):
        if logits_all:
            raise ValueError("the kvpress reference methods run the generated QA tasks only")
        return ReferenceModel(model_path, press, kv_budget, n_threads)

    return create


_DESCRIPTIONS = {
    "full": "kvpress reference, no press: transformers on the GGUF weights dequantized to float32",
    "kvcompose": "kvpress 0.5.5 KVComposePress (the authors' KVCompose), context compressed once",
    "snapkv": "kvpress 0.5.5 SnapKVPress, context compressed once",
    "pyramidkv": "kvpress 0.5.5 PyramidKVPress, context compressed once",
    "tova": "kvpress 0.5.5 TOVAPress, context compressed once",
    "streaming": "kvpress 0.5.5 StreamingLLMPress, context compressed once",
}


def method(name: str) -> Method:
    """The Method for `kvpress:<press>`; MethodUnavailableError without torch/kvpress."""
    press = name[len(PREFIX):]
    if press not in PRESSES:
        raise UnknownMethodError(f"unknown kvpress press {press!r}; available: {', '.join(method_names())}")
    check_available()
    return Method(
        name=name,
        description=_DESCRIPTIONS[press],
        create=_factory(press),
        kv_usage=reference_kv_usage,
        compresses=PRESSES[press] is not None,
        observation_modes=(),
        question_apart=True,
        details=_details,
    )


# --- agreement with our implementation --------------------------------------------------


def layer_budget_comparison(ours: list[int], theirs: list[int], n_context: int) -> dict:
    a, b = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    diff = a - b
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None
    return {
        "ours": [int(x) for x in ours],
        "kvpress": [int(x) for x in theirs],
        "difference": [int(x) for x in diff],
        "total_ours": int(a.sum()),
        "total_kvpress": int(b.sum()),
        "mean_abs_difference": round(float(np.abs(diff).mean()), 2),
        "mean_abs_difference_of_context": round(float(np.abs(diff).mean()) / max(1, n_context), 4),
        "max_abs_difference": int(np.abs(diff).max()),
        "correlation": None if corr is None else round(corr, 4),
    }
