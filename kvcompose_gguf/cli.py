"""`kvcompose` command line: `kvcompose chat`, the interactive chat demo.

The chat keeps the whole conversation as a token history and streams each reply.
After every reply a status line shows the conversation's logical length, the
cells in use, the compressions so far and the KV memory. With `--policy none`
(stock llama.cpp) a chat that outgrows `--n-ctx` ends its turn with a clear
message instead of a traceback; with a policy the cache is compressed instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import TextIO

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
DEFAULT_SYSTEM = "You are a helpful assistant."
HELP_TEXT = """commands:
  /stats        the KV cache in detail
  /reset        forget the conversation (keeps the system prompt)
  /help         this text
  /quit         leave (Ctrl-D works too)
Ctrl-C stops the current reply, not the session."""


class CliError(Exception):
    """An error the user can fix; printed as one line, never as a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompose", description="KVCompose KV cache compression for llama.cpp")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a GGUF model (default: SmolLM2-135M-Instruct)")
    chat.add_argument("model", nargs="?", default=None, help="GGUF path or known model name (default: smollm2-135m)")
    chat.add_argument("--n-ctx", type=int, default=2048, help="context size in cells (default 2048)")
    chat.add_argument("--budget", type=_budget, default=0.5, help="kv_budget: fraction of cells kept (0,1] or a cell count")
    chat.add_argument("--policy", default="kvcompose", help="compression policy (default kvcompose), 'none' for stock llama.cpp")
    chat.add_argument("--observe", default="window", help="observation mode: window, repeat, or a task prompt")
    chat.add_argument("--n-gpu-layers", type=int, default=0)
    chat.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True)
    chat.add_argument("--cache-type-k", choices=CACHE_TYPES, default="f16")
    chat.add_argument("--cache-type-v", choices=CACHE_TYPES, default="f16")
    chat.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens")
    chat.add_argument("--json", action="store_true", help="print one JSON object of stats per turn (for scripts)")
    from .eval.command import add_eval_parser

    add_eval_parser(sub)
    return parser


def _budget(text: str) -> float | int:
    try:
        value: float | int = int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a fraction in (0, 1] or a cell count, not {text!r}") from None
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fractional budget must lie in (0, 1], not {value}")
    if isinstance(value, int) and value <= 0:
        raise argparse.ArgumentTypeError(f"a cell-count budget must be positive, not {value}")
    return value


def _ggml_type(name: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"GGML_TYPE_{name.upper()}"))


def load_model(args: argparse.Namespace):
    """The `Llama` for these options; raises CliError for anything the user can fix."""
    if args.cache_type_v != "f16" and not args.flash_attn:
        raise CliError("a quantized V cache needs flash attention (drop --no-flash-attn)")
    try:
        import kvcompose_gguf  # noqa: F401  (checks the patched library)
        from kvcompose_gguf import models
    except ImportError as exc:
        raise CliError(str(exc)) from None
    try:
        path = models.model_path(args.model)
    except models.ModelNotInstalledError as exc:
        raise CliError(str(exc)) from None

    from .llama import Llama

    compression = {}
    if args.policy != "none":
        compression = dict(kv_compress=args.policy, kv_budget=args.budget, kv_observe=args.observe)
    try:
        return Llama(
            model_path=str(path),
            n_ctx=args.n_ctx,
            n_gpu_layers=args.n_gpu_layers,
            flash_attn=args.flash_attn,
            type_k=_ggml_type(args.cache_type_k),
            type_v=_ggml_type(args.cache_type_v),
            seed=args.seed,
            verbose=False,
            **compression,
        )
    except (ValueError, TypeError, NotImplementedError) as exc:  # bad settings, or a model llama.cpp cannot load
        raise CliError(f"could not start {path.name}: {exc}") from None


@dataclass
class TurnStats:
    turn: int
    logical_tokens: int
    cells_used: int
    n_ctx: int
    compressions: int
    last_compression_seconds: float | None
    kv_bytes_allocated: int
    kv_bytes_full_cache: int  # what a full cache of logical_tokens cells would need
    layer_budgets: list | None
    reply_tokens: int
    stopped: str

    def status_line(self) -> str:
        line = f"[turn {self.turn} | tokens {self.logical_tokens} | cells {self.cells_used}/{self.n_ctx}"
        if self.compressions:
            line += f" | {self.compressions} compressions, last {self.last_compression_seconds:.2f} s"
        line += f" | KV {self.kv_bytes_allocated / 2**20:.1f} MiB (full cache: {self.kv_bytes_full_cache / 2**20:.1f} MiB)"
        if self.layer_budgets:
            line += f" | layers {sparkline(self.layer_budgets)}"
        return line + f" | {self.stopped}]"


def sparkline(values: list) -> str:
    """One character per value, scaled to the largest."""
    bars = "▁▂▃▄▅▆▇█"
    top = max(values) or 1
    return "".join(bars[min(len(bars) - 1, int(v / top * (len(bars) - 1) + 0.5))] for v in values)


def kv_bytes_allocated(llm) -> int:
    """Bytes of the K and V tensors llama.cpp allocated for n_ctx cells (every layer holds every cell)."""
    import llama_cpp

    model = llm._model.model
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_embd_kv = llama_cpp.llama_model_n_head_kv(model) * (
        llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    )
    type_k = llm.context_params.type_k
    type_v = llm.context_params.type_v
    row = _row_bytes(type_k, n_embd_kv) + _row_bytes(type_v, n_embd_kv)
    return n_layer * llm.n_ctx() * row


def _row_bytes(ggml_type: int, n: int) -> int:
    import gguf  # type sizes: (elements per block, bytes per block)

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return n // block * size


@dataclass
class ChatSession:
    llm: object
    system: str
    max_tokens: int
    temperature: float
    messages: list = field(default_factory=list)
    turn: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turn = 0

    def reply(self, text: str, out: TextIO) -> TurnStats:
        """Stream the assistant's answer to `out`; the turn stays in the history even if cut short."""
        self.turn += 1
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        n_reply = 0
        stopped = "done"
        try:
            stream = self.llm.create_chat_completion(
                messages=self.messages, max_tokens=self.max_tokens, temperature=self.temperature, stream=True
            )
            for chunk in stream:
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    pieces.append(delta)
                    n_reply += 1
                    out.write(delta)
                    out.flush()
                if chunk["choices"][0].get("finish_reason") == "length":
                    stopped = "max tokens"
        except KeyboardInterrupt:
            stopped = "interrupted"
        except ValueError as exc:  # the context window (stock) or the compression settings refused the turn
            self.messages.pop()
            self.turn -= 1
            hint = " Stock llama.cpp cannot go on;" if "exceed context window" in str(exc) else ""
            raise CliError(f"{exc}.{hint} /reset starts over.") from None
        out.write("\n")
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        return self.stats(n_reply, stopped)

    def stats(self, reply_tokens: int = 0, stopped: str = "idle") -> TurnStats:
        kv = self.llm.kv_stats()
        allocated = kv_bytes_allocated(self.llm)
        return TurnStats(
            turn=self.turn,
            logical_tokens=kv["logical_tokens"],
            cells_used=kv["cells_used"],
            n_ctx=kv["n_ctx"],
            compressions=kv["compressions"],
            last_compression_seconds=kv["last_compression_seconds"],
            kv_bytes_allocated=allocated,
            kv_bytes_full_cache=allocated // kv["n_ctx"] * kv["logical_tokens"],
            layer_budgets=kv["layer_budgets"],
            reply_tokens=reply_tokens,
            stopped=stopped,
        )


def _read_line(interactive: bool) -> str | None:
    try:
        return input("> ") if interactive else sys.stdin.readline() or None
    except EOFError:
        return None


def run_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty() and not args.json
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    llm = load_model(args)
    session = ChatSession(llm, args.system, args.max_tokens, args.temperature)
    if interactive:
        print(f"kvcompose chat: policy {args.policy}, n_ctx {args.n_ctx}. /help for commands.", file=sys.stderr)
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _slash_command(text, session) == "quit":
                return 0
            continue
        try:
            stats = session.reply(text, sys.stdout if not args.json else _NullWriter())
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"reply": session.messages[-1]["content"], **stats.__dict__}), flush=True)
        else:
            print(stats.status_line(), file=sys.stderr, flush=True)


def _slash_command(text: str, session: ChatSession) -> str | None:
    command = text.split()[0]
    if command in ("/quit", "/exit"):
        return "quit"
    if command == "/reset":
        session.reset()
        print("conversation reset", file=sys.stderr)
    elif command == "/stats":
        print(json.dumps(session.stats().__dict__, indent=2), file=sys.stderr)
    elif command == "/help":
        print(HELP_TEXT, file=sys.stderr)
    else:
        print(f"error: unknown command {command}; /help lists them", file=sys.stderr)
    return None


class _NullWriter:
    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            from .eval.command import run_eval_command

            return run_eval_command(args, argv)
        return run_chat(args)
    except CliError as exc:
        print(f"kvcompose: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
