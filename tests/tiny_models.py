"""Tiny random GGUF models for fast tests, written with the `gguf` package.

A byte-level SentencePiece vocabulary (every byte is a token) lets llama.cpp
tokenize and detokenize any text, so the same fixture serves the native tests
and the `Llama` integration. Weights are random but seeded: a given set of
arguments always writes the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_SPECIAL = 3  # <unk>, <s>, </s>
N_VOCAB = N_SPECIAL + 256


@dataclass(frozen=True)
class TinyConfig:
    arch: str = "llama"
    n_layer: int = 4
    n_head: int = 8
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff: int = 256
    n_ctx_train: int = 4096
    rope_freq_base: float = 10000.0
    seed: int = 0

    @property
    def n_embd(self) -> int:
        return self.n_head * self.head_dim


def _tokenizer(writer) -> None:
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def write_tiny_model(path: str | Path, config: TinyConfig = TinyConfig()) -> Path:
    """Write a random model of `config.arch` (llama family) to `path`."""
    import gguf

    if config.arch != "llama":
        raise NotImplementedError(f"tiny fixtures exist for llama only, not {config.arch!r}")
    path = Path(path)
    rng = np.random.default_rng(config.seed)
    c = config
    n_embd, n_embd_kv = c.n_embd, c.n_head_kv * c.head_dim

    def weight(rows: int, cols: int, scale: float) -> np.ndarray:
        # numpy shape (rows, cols) is ggml ne [cols, rows]: cols are the inputs.
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float16)

    writer = gguf.GGUFWriter(str(path), c.arch)
    writer.add_context_length(c.n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.n_ff)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_freq_base)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _tokenizer(writer)

    # Larger q/k weights than 1/sqrt(n_embd) give peaked, non-uniform attention,
    # which is what the statistics and selection tests need to discriminate.
    writer.add_tensor("token_embd.weight", weight(N_VOCAB, n_embd, 1.0))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weight(N_VOCAB, n_embd, n_embd**-0.5))
    for il in range(c.n_layer):
        p = f"blk.{il}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", weight(n_embd, n_embd, 2.0 * n_embd**-0.5))
        writer.add_tensor(p + "attn_k.weight", weight(n_embd_kv, n_embd, 2.0 * n_embd**-0.5))
        writer.add_tensor(p + "attn_v.weight", weight(n_embd_kv, n_embd, n_embd**-0.5))
        writer.add_tensor(p + "attn_output.weight", weight(n_embd, n_embd, n_embd**-0.5))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", weight(c.n_ff, n_embd, n_embd**-0.5))
        writer.add_tensor(p + "ffn_up.weight", weight(c.n_ff, n_embd, n_embd**-0.5))
        writer.add_tensor(p + "ffn_down.weight", weight(n_embd, c.n_ff, c.n_ff**-0.5))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
