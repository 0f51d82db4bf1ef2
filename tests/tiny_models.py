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
    embedding_length: int = 0  # 0: n_head * head_dim; qwen3 and mistral3 allow another width

    @property
    def n_embd(self) -> int:
        return self.embedding_length or self.n_head * self.head_dim


# Architectures the fixtures write. The first four are what compression supports (RoPE,
# plain KV cache); the others exist to check that they are refused:
#   llama:    the reference layout (SmolLM2's architecture)
#   qwen2:    biases on Q, K and V
#   qwen3:    RMS norms on each Q and K head (q/k norm), head width independent of n_embd
#   mistral3: Mistral's llama-like layout under its own architecture name
#   qwen2vl:  M-RoPE (rope sections); bloom: ALiBi, no RoPE; mamba: recurrent, no KV cache
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral3", "qwen2vl", "bloom", "mamba")


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
    """Write a random model of `config.arch` (one of ARCHITECTURES) to `path`."""
    import gguf

    if config.arch not in ARCHITECTURES:
        raise NotImplementedError(f"tiny fixtures exist for {', '.join(ARCHITECTURES)}, not {config.arch!r}")
    path = Path(path)
    rng = np.random.default_rng(config.seed)
    c = config
    n_embd = c.n_embd
    n_q, n_kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim

    def weight(rows: int, cols: int, scale: float) -> np.ndarray:
        # numpy shape (rows, cols) is ggml ne [cols, rows]: cols are the inputs.
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float16)

    def vector(n: int, scale: float = 0.0, mean: float = 0.0) -> np.ndarray:
        return (mean + rng.standard_normal(n) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), c.arch)
    writer.add_context_length(c.n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(0 if c.arch == "mamba" else c.n_ff)
    writer.add_head_count(0 if c.arch == "mamba" else c.n_head)
    writer.add_head_count_kv(0 if c.arch == "mamba" else c.n_head_kv)
    if c.arch == "bloom":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(1e-5)
    if c.arch not in ("bloom", "mamba"):
        writer.add_rope_dimension_count(c.head_dim)
        writer.add_rope_freq_base(c.rope_freq_base)
    if c.embedding_length:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if c.arch == "qwen2vl":
        quarter = c.head_dim // 4
        writer.add_rope_dimension_sections([quarter, quarter, c.head_dim // 2 - 2 * quarter, 0])
    if c.arch == "mamba":
        writer.add_ssm_conv_kernel(4)
        writer.add_ssm_inner_size(2 * n_embd)
        writer.add_ssm_state_size(16)
        writer.add_ssm_time_step_rank(16)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _tokenizer(writer)

    # Larger q/k weights than 1/sqrt(n_embd) give peaked, non-uniform attention,
    # which is what the statistics and selection tests need to discriminate.
    qk = 2.0 * n_embd**-0.5
    writer.add_tensor("token_embd.weight", weight(N_VOCAB, n_embd, 1.0))
    if c.arch == "bloom":
        writer.add_tensor("token_embd_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor("token_embd_norm.bias", vector(n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if c.arch == "bloom":
        writer.add_tensor("output_norm.bias", vector(n_embd))
    writer.add_tensor("output.weight", weight(N_VOCAB, n_embd, n_embd**-0.5))
    for il in range(c.n_layer):
        p = f"blk.{il}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        if c.arch == "mamba":
            _mamba_layer(writer, p, n_embd, weight, vector)
            continue
        if c.arch == "bloom":
            writer.add_tensor(p + "attn_norm.bias", vector(n_embd))
            writer.add_tensor(p + "attn_qkv.weight", np.concatenate(
                [weight(n_q, n_embd, qk), weight(n_kv, n_embd, qk), weight(n_kv, n_embd, n_embd**-0.5)]))
            writer.add_tensor(p + "attn_qkv.bias", vector(n_q + 2 * n_kv, 0.1))
        else:
            writer.add_tensor(p + "attn_q.weight", weight(n_q, n_embd, qk))
            writer.add_tensor(p + "attn_k.weight", weight(n_kv, n_embd, qk))
            writer.add_tensor(p + "attn_v.weight", weight(n_kv, n_embd, n_embd**-0.5))
        if c.arch in ("qwen2", "qwen2vl"):
            for name, n in (("attn_q", n_q), ("attn_k", n_kv), ("attn_v", n_kv)):
                writer.add_tensor(p + name + ".bias", vector(n, 0.5))
        if c.arch == "qwen3":
            # per-head norms with non-unit gains: the normalised Q and K still differ by head
            writer.add_tensor(p + "attn_q_norm.weight", vector(c.head_dim, 0.3, 2.0))
            writer.add_tensor(p + "attn_k_norm.weight", vector(c.head_dim, 0.3, 2.0))
        writer.add_tensor(p + "attn_output.weight", weight(n_embd, n_q, n_q**-0.5))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        if c.arch == "bloom":
            writer.add_tensor(p + "attn_output.bias", vector(n_embd))
            writer.add_tensor(p + "ffn_norm.bias", vector(n_embd))
            writer.add_tensor(p + "ffn_up.bias", vector(c.n_ff))
            writer.add_tensor(p + "ffn_down.bias", vector(n_embd))
        else:
            writer.add_tensor(p + "ffn_gate.weight", weight(c.n_ff, n_embd, n_embd**-0.5))
        writer.add_tensor(p + "ffn_up.weight", weight(c.n_ff, n_embd, n_embd**-0.5))
        writer.add_tensor(p + "ffn_down.weight", weight(n_embd, c.n_ff, c.n_ff**-0.5))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _mamba_layer(writer, p: str, n_embd: int, weight, vector) -> None:
    d_inner, d_conv, d_state, dt_rank = 2 * n_embd, 4, 16, 16
    writer.add_tensor(p + "ssm_in.weight", weight(2 * d_inner, n_embd, n_embd**-0.5))
    writer.add_tensor(p + "ssm_conv1d.weight", vector(d_inner * d_conv, 0.5).reshape(d_inner, d_conv))
    writer.add_tensor(p + "ssm_conv1d.bias", vector(d_inner))
    writer.add_tensor(p + "ssm_x.weight", weight(dt_rank + 2 * d_state, d_inner, d_inner**-0.5))
    writer.add_tensor(p + "ssm_dt.weight", weight(d_inner, dt_rank, dt_rank**-0.5))
    writer.add_tensor(p + "ssm_dt.bias", vector(d_inner))
    writer.add_tensor(p + "ssm_a", -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)))
    writer.add_tensor(p + "ssm_d", np.ones(d_inner, dtype=np.float32))
    writer.add_tensor(p + "ssm_out.weight", weight(n_embd, d_inner, d_inner**-0.5))
