"""`kvcompose` command line: `kvcompose chat` (the interactive demo), `kvcompose serve` and
`kvcompose calibrate` (plus `eval` and `bench`, in their packages).

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
from pathlib import Path
from typing import TextIO

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
DEFAULT_SYSTEM = "You are a helpful assistant."
HELP_TEXT = """commands:
  /stats        the KV cache in detail: per-layer slots kept, then every number
  /budget X     keep a fraction X in (0, 1] or X cells at each compression
  /policy NAME  switch the compression policy ('none' for stock llama.cpp)
  /save FILE    save the session: the compressed cache and the conversation
  /load FILE    continue a session saved with /save
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
    chat.add_argument("--kv-memory", type=_kv_memory, default=None,
                      help="per-layer KV memory: a fraction in (0, 1) of a full n_ctx cache, or bytes "
                      "(layers sized from `kvcompose calibrate`'s profile)")
    chat.add_argument("--observe", default="reread",
                      help="observation mode: reread (default: keeps what each turn looked important when it arrived), "
                      "window, lookahead, repeat, or a task prompt")
    chat.add_argument("--n-gpu-layers", type=int, default=0)
    chat.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True)
    chat.add_argument("--cache-type-k", choices=CACHE_TYPES, default="f16")
    chat.add_argument("--cache-type-v", choices=CACHE_TYPES, default="f16")
    chat.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens")
    chat.add_argument("--json", action="store_true", help="print one JSON object of stats per turn (for scripts)")
    add_serve_parser(sub)
    add_calibrate_parser(sub)
    from .eval.command import add_eval_parser

    add_eval_parser(sub)
    from .bench.end_to_end import add_bench_parser

    add_bench_parser(sub)
    return parser


def add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve", help="OpenAI-compatible server (llama-cpp-python's) with KV cache compression",
        description="Serve /v1/chat/completions and /v1/completions; GET /kv/stats shows the cache. "
        "Every other llama-cpp-python server setting can be given as an environment variable (e.g. N_BATCH=256).",
    )
    serve.add_argument("model", nargs="?", default=None, help="GGUF path or known model name (default: smollm2-135m)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--n-ctx", type=int, default=2048, help="context size in cells (default 2048)")
    serve.add_argument("--budget", type=_budget, default=0.5, help="kv_budget: fraction of cells kept (0,1] or a cell count")
    serve.add_argument("--policy", default="kvcompose", help="compression policy (default kvcompose), 'none' for stock llama.cpp")
    serve.add_argument("--observe", default="reread",
                       help="observation mode: reread (default), window, lookahead, repeat, or a task prompt")
    serve.add_argument("--protect-prefix", type=_protect_prefix, default="system",
                       help="first tokens never dropped: a count, or 'system' (the system message; default)")
    serve.add_argument("--protect-recent", type=int, default=64, help="last tokens never dropped")
    serve.add_argument("--kv-memory", type=_kv_memory, default=None,
                       help="per-layer KV memory: a fraction in (0, 1) of a full n_ctx cache, or bytes")
    serve.add_argument("--n-gpu-layers", type=int, default=0)
    serve.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True)
    serve.add_argument("--cache-type-k", choices=CACHE_TYPES, default="f16")
    serve.add_argument("--cache-type-v", choices=CACHE_TYPES, default="f16")
    serve.add_argument("--chat-format", default=None, help="llama-cpp-python chat format (default: the model's template)")
    serve.add_argument("--api-key", default=None, help="require this bearer token")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--verbose", action="store_true", help="llama.cpp and uvicorn logs")


def run_serve(args: argparse.Namespace) -> int:
    if args.cache_type_v != "f16" and not args.flash_attn:
        raise CliError("a quantized V cache needs flash attention (drop --no-flash-attn)")
    try:
        from . import models
        from .server import KVSettings, serve

        model = str(models.model_path(args.model))
    except ImportError as exc:
        raise CliError(str(exc)) from None
    except models.ModelNotInstalledError as exc:
        raise CliError(str(exc)) from None
    try:
        settings = KVSettings(
            model=model, host=args.host, port=args.port, n_ctx=args.n_ctx, kv_compress=args.policy,
            kv_budget=args.budget, kv_observe=args.observe, kv_protect_prefix=args.protect_prefix,
            kv_protect_recent=args.protect_recent, kv_memory=args.kv_memory, n_gpu_layers=args.n_gpu_layers,
            flash_attn=args.flash_attn,
            type_k=_ggml_type(args.cache_type_k), type_v=_ggml_type(args.cache_type_v),
            chat_format=args.chat_format, api_key=args.api_key, seed=args.seed, verbose=args.verbose,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", lambda: [])()
        text = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or str(exc)
        raise CliError(f"bad setting: {text}") from None
    try:
        serve(settings)
    except (ValueError, TypeError, NotImplementedError) as exc:  # refused while loading the model
        raise CliError(f"could not start {Path(model).name}: {exc}") from None
    return 0


def add_calibrate_parser(sub) -> None:
    cal = sub.add_parser(
        "calibrate", help="measure a model's per-layer KVCompose keep fractions and cache them",
        description="Prefill seeded windows of text that ships with Python, observe each by re-feeding it, "
        "select once with KVCompose, and cache the mean share of the window each layer keeps, per budget.",
    )
    cal.add_argument("model", nargs="?", default=None, help="GGUF path or known model name (default: smollm2-135m)")
    cal.add_argument("--budgets", default="0.75,0.5,0.25,0.1", help="kv_budget fractions (default 0.75,0.5,0.25,0.1)")
    cal.add_argument("--tokens", type=int, default=1024, help="tokens per window (default 1024)")
    cal.add_argument("--windows", type=int, default=3, help="windows of text (default 3)")
    cal.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    cal.add_argument("--force", action="store_true", help="measure again even if a profile is cached")
    cal.add_argument("--json", action="store_true", help="print the profiles as JSON")


def run_calibrate(args: argparse.Namespace) -> int:
    from . import models, profiles

    try:
        path = models.model_path(args.model)
        budgets = tuple(_budget_fraction(b) for b in args.budgets.split(","))
    except models.ModelNotInstalledError as exc:
        raise CliError(str(exc)) from None
    cached = None if args.force else profiles.load(path)
    if cached is not None and set(budgets) <= set(cached):
        result, where = {b: cached[b] for b in budgets}, f"cached: {profiles.profile_path(path)}"
    else:
        try:
            result = profiles.calibrate(path, budgets, tokens=args.tokens, windows=args.windows,
                                        n_threads=args.threads, progress=lambda m: print(m, file=sys.stderr))
        except (ValueError, NotImplementedError) as exc:
            raise CliError(f"cannot calibrate {path.name}: {exc}") from None
        where = f"saved: {profiles.save(path, {**(cached or {}), **result})}"
    if args.json:
        print(json.dumps({str(b): vars(p) for b, p in result.items()}, indent=1))
    else:
        print(f"{path.name}: share of the window each layer keeps (KVCompose, repeat observation)")
        print("layer | " + " | ".join(f"kv_budget {b}" for b in budgets))
        for layer in range(len(next(iter(result.values())).keep_fractions)):
            if not any(result[b].keep_fractions[layer] for b in budgets):
                print(f"{layer:5d} | not compressed (sliding-window cache)")
                continue
            print(f"{layer:5d} | " + " | ".join(f"{result[b].keep_fractions[layer]:.3f}" for b in budgets))
    print(where, file=sys.stderr)
    return 0


def _budget_fraction(text: str) -> float:
    try:
        value = _budget(text)
    except argparse.ArgumentTypeError as exc:
        raise CliError(str(exc)) from None
    if not isinstance(value, float):
        raise CliError(f"calibration budgets are fractions in (0, 1], not {text!r}")
    return value


def _protect_prefix(text: str) -> int | str:
    if text == "system":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"protect-prefix must be a token count or 'system', not {text!r}")
    return int(text)


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


def _kv_memory(text: str) -> float | int:
    try:
        value: float | int = int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"kv-memory must be a fraction in (0, 1) or a byte count, not {text!r}") from None
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a fractional kv-memory must lie in (0, 1), not {value}")
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
    if args.policy != "none":
        from .policies import get_policy

        try:  # before the model: a typo is reported as such, also where the model is missing
            get_policy(args.policy)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    try:
        path = models.model_path(args.model)
    except models.ModelNotInstalledError as exc:
        raise CliError(str(exc)) from None

    from .llama import Llama

    compression = {}
    if args.policy != "none":
        compression = dict(kv_compress=args.policy, kv_budget=args.budget, kv_observe=args.observe)
        if getattr(args, "kv_memory", None) is not None:
            compression["kv_memory"] = args.kv_memory
    elif getattr(args, "kv_memory", None) is not None:
        raise CliError("--kv-memory sizes a compressed cache: it needs a --policy other than 'none'")
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
    kv_bytes_full_n_ctx: int  # what a full cache of n_ctx cells takes (more than allocated with --kv-memory)
    layer_budgets: list | None
    layer_allocation: list | None
    reply_tokens: int
    stopped: str

    def status_line(self) -> str:
        line = f"[turn {self.turn} | tokens {self.logical_tokens} | cells {self.cells_used}/{self.n_ctx}"
        if self.compressions:
            line += f" | {self.compressions} compressions, last {self.last_compression_seconds:.2f} s"
        line += f" | KV {self.kv_bytes_allocated / 2**20:.1f} MiB"
        if self.kv_bytes_full_n_ctx != self.kv_bytes_allocated:
            line += f" of a full {self.n_ctx}-cell cache's {self.kv_bytes_full_n_ctx / 2**20:.1f}"
        line += f" (full cache: {self.kv_bytes_full_cache / 2**20:.1f} MiB)"
        if self.layer_allocation:
            line += f" | allocation {sparkline(self.layer_allocation)}"
        return line + f" | {self.stopped}]"


def sparkline(values: list) -> str:
    """One character per value, scaled to the largest."""
    bars = "▁▂▃▄▅▆▇█"
    top = max(values) or 1
    return "".join(bars[min(len(bars) - 1, int(v / top * (len(bars) - 1) + 0.5))] for v in values)


def _compactor(llm):
    from .compactor import Compactor

    kv = getattr(llm, "_kv", None)
    return kv.compactor if kv is not None else Compactor(llm)


def kv_bytes_allocated(llm) -> int:
    """Bytes of the K and V tensors llama.cpp allocated, read from the tensors (each layer's
    own rows with per-layer memory), plus an iSWA model's sliding-window cache."""
    compactor = _compactor(llm)
    swa = compactor.swa_cache(0)
    return compactor.layout.allocated_bytes + (swa.bytes if swa is not None else 0)


def kv_bytes_full_cache(llm, n_tokens: int) -> int:
    """What a stock cache holding n_tokens cells in every layer would take."""
    compactor = _compactor(llm)
    swa = compactor.swa_cache(0)
    return compactor.layout.full_cache_bytes(n_tokens) + (swa.cell_bytes * n_tokens if swa is not None else 0)


@dataclass
class ChatSession:
    llm: object
    system: str
    max_tokens: int
    temperature: float
    messages: list = field(default_factory=list)
    turn: int = 0
    args: argparse.Namespace | None = None  # the options the model was loaded with

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turn = 0

    def reply(self, text: str, out: TextIO) -> TurnStats:
        """Stream the assistant's answer to `out`; the turn stays in the history even if cut short."""
        pieces: list[str] = []
        n_reply = 0
        stopped = "done"
        ctrl_c = _CtrlC()
        with ctrl_c:  # before the history changes: an early Ctrl-C cannot leave half a turn
            self.turn += 1
            self.messages.append({"role": "user", "content": text})
            try:
                stream = self.llm.create_chat_completion(
                    messages=self.messages, max_tokens=self.max_tokens, temperature=self.temperature, stream=True,
                    logits_processor=[ctrl_c.end_of_generation(self.llm.token_eos())],
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
                    if ctrl_c.pressed:
                        stream.close()
                        break
            except KeyboardInterrupt:  # a second Ctrl-C
                pass
            except ValueError as exc:  # the context window (stock) or the compression settings refused the turn
                if pieces:
                    out.write("\n")  # the error starts its own line after a partial reply
                self.messages.pop()
                self.turn -= 1
                hint = " Stock llama.cpp cannot go on;" if "exceed context window" in str(exc) else ""
                raise CliError(f"{exc}.{hint} /reset starts over.") from None
            if ctrl_c.pressed:
                stopped = "interrupted"
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
            kv_bytes_full_cache=kv_bytes_full_cache(self.llm, kv["logical_tokens"]),
            kv_bytes_full_n_ctx=kv_bytes_full_cache(self.llm, kv["n_ctx"]),
            layer_budgets=kv["layer_budgets"],
            layer_allocation=kv["layer_allocation"],
            reply_tokens=reply_tokens,
            stopped=stopped,
        )


class _CtrlC:
    """Ctrl-C during a reply: stop at the next token instead of raising where it lands.

    A KeyboardInterrupt raised inside a compression (half observed, half compacted) or
    inside llama.cpp's eval callback (where ctypes swallows it and the decode fails) would
    leave the cache inconsistent; a flag read between tokens cannot. A second Ctrl-C
    raises at once, for a reply that is slow to produce its next token.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def end_of_generation(self, eos: int):
        """A logits processor that leaves only end-of-generation once Ctrl-C was pressed.

        It runs for every sampled token, also where the text streams no chunk (bytes of
        an unfinished character), so the reply ends at the next token either way.
        """
        import numpy as np

        def processor(input_ids, logits):
            if not self.pressed:
                return logits
            only_eos = np.full_like(logits, -np.inf)
            only_eos[eos] = 0.0
            return only_eos

        return processor

    def _handle(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __enter__(self) -> "_CtrlC":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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
    session = ChatSession(llm, args.system, args.max_tokens, args.temperature, args=args)
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
        try:
            if text.startswith("/"):
                if _slash_command(text, session) == "quit":
                    return 0
                continue
            stats = session.reply(text, sys.stdout if not args.json else _NullWriter())
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # pressed before the reply started: nothing was said
            print(file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"reply": session.messages[-1]["content"], **stats.__dict__}), flush=True)
        else:
            print(stats.status_line(), file=sys.stderr, flush=True)


def _slash_command(text: str, session: ChatSession) -> str | None:
    command, _, rest = text.partition(" ")
    rest = rest.strip()
    if command in ("/quit", "/exit"):
        return "quit"
    try:
        if command == "/reset":
            session.reset()
            print("conversation reset", file=sys.stderr)
        elif command == "/stats":
            print(stats_report(session.stats()), file=sys.stderr)
        elif command == "/budget":
            try:
                budget = _budget(_argument(command, rest, "a fraction in (0, 1] or a cell count"))
            except argparse.ArgumentTypeError as exc:
                raise CliError(str(exc)) from None
            reconfigure(session, budget=budget)
            print(f"budget {budget}: {_kept(session)}", file=sys.stderr)
        elif command == "/policy":
            reconfigure(session, policy=_argument(command, rest, "a policy name, or 'none'"))
            print(f"policy {session.args.policy}: {_kept(session)}", file=sys.stderr)
        elif command == "/save":
            path = _argument(command, rest, "a file name")
            size = save_session(session, path)
            print(f"saved {len(session.messages)} messages and {size} bytes to {path}", file=sys.stderr)
        elif command == "/load":
            load_session(session, _argument(command, rest, "a file name"))
            print(f"loaded {len(session.messages)} messages; {session.stats().status_line()}", file=sys.stderr)
        elif command == "/help":
            print(HELP_TEXT, file=sys.stderr)
        else:
            print(f"error: unknown command {command}; /help lists them", file=sys.stderr)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return None


def _argument(command: str, rest: str, what: str) -> str:
    if not rest:
        raise CliError(f"{command} needs {what}")
    return rest


def _kept(session: ChatSession) -> str:
    return f"the conversation ({len(session.messages)} messages) is kept and re-read on the next turn"


def stats_report(stats: TurnStats) -> str:
    """/stats: the per-layer table of the last compression, then every number as JSON."""
    lines = []
    if stats.layer_budgets:
        # The fraction is of the widest layer, whose slots set the cells every layer occupies.
        widest = max(stats.layer_budgets) or 1
        lines.append("last compression, per layer (allocated: the policy's budget split; in a shared pool")
        lines.append("every layer then fills the widest layer's cells with its next-best tokens):")
        lines.append("layer  slots kept  fraction of widest  allocated")
        for layer, (kept, allocated) in enumerate(zip(stats.layer_budgets, stats.layer_allocation)):
            lines.append(f"{layer:5d}  {kept:10d}  {kept / widest:18.3f}  {allocated:9d}")
    else:
        lines.append("no compression yet: every layer holds every cell")
    lines.append(json.dumps(stats.__dict__, indent=2))
    return "\n".join(lines)


def reconfigure(session: ChatSession, **changes) -> None:
    """Reload the model with changed options, keeping the conversation.

    The new `Llama` is built before the old one is closed, so refused options lose nothing.
    The next turn re-reads (and, if needed, compresses) the whole conversation.
    """
    args = argparse.Namespace(**{**vars(session.args), **changes})
    llm = load_model(args)
    session.llm.close()
    session.llm, session.args = llm, args


# The session file: a small container beside llama.cpp's (or our versioned) state:
#   MAGIC | u32 version | u32 header bytes | header (JSON) | input ids int32 | last logits float32
#   | score memory keys int64, scores float32 (version 2) | state bytes | sha256 of everything before it
SESSION_MAGIC = b"KVCCHAT\0"
SESSION_VERSION = 2
SESSION_VERSIONS_READ = (1, 2)  # version 1: no score memory, no position offset
_SESSION_OPTIONS = ("model", "n_ctx", "policy", "budget", "observe", "cache_type_k", "cache_type_v", "flash_attn")


def save_session(session: ChatSession, path: str) -> int:
    """Write the conversation and the (compressed) cache to `path`; returns the bytes written."""
    import hashlib
    import struct

    import numpy as np

    from .stats import ScoreMemory

    llm = session.llm
    state = llm.save_state()
    n_tokens = int(state.n_tokens)
    input_ids = np.asarray(state.input_ids[:n_tokens], dtype=np.int32)
    # The logits are recomputed by the next turn (it re-evaluates at least one token);
    # only the last row is kept so a session file stays small.
    scores = np.asarray(state.scores, dtype=np.float32)
    last_logits = scores[min(n_tokens, len(scores)) - 1] if n_tokens and len(scores) else np.zeros(0, np.float32)
    blob = bytes(state.llama_state)
    memory_keys, memory_scores = getattr(state, "kv_score_memory", ScoreMemory.EMPTY_STATE)
    header = {
        "messages": session.messages,
        "turn": session.turn,
        "options": {k: getattr(session.args, k) for k in _SESSION_OPTIONS},
        "model_file": _model_file(llm),
        "n_tokens": n_tokens,
        "n_vocab": len(last_logits),
        "seed": int(state.seed),
        "kv_compressed_upto": getattr(state, "kv_compressed_upto", None),
        "kv_position_offset": getattr(state, "kv_position_offset", 0),
        "kv_reread_upto": getattr(state, "kv_reread_upto", None),
        "memory_entries": len(memory_keys),
        "state_bytes": len(blob),
    }
    encoded = json.dumps(header).encode()
    body = (SESSION_MAGIC + struct.pack("<II", SESSION_VERSION, len(encoded)) + encoded
            + input_ids.tobytes() + last_logits.tobytes()
            + np.asarray(memory_keys, np.int64).tobytes() + np.asarray(memory_scores, np.float32).tobytes() + blob)
    data = body + hashlib.sha256(body).digest()
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise CliError(f"could not save to {path}: {exc.strerror or exc}") from None
    return len(data)


def read_session(path: str) -> tuple[dict, "llama_cpp.LlamaState"]:  # noqa: F821
    """The header and state of a session file; CliError if it is unreadable, corrupt or foreign."""
    import hashlib
    import struct

    import llama_cpp
    import numpy as np

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CliError(f"could not read {path}: {exc.strerror or exc}") from None
    fixed = len(SESSION_MAGIC) + 8
    if len(data) < fixed + 32 or not data.startswith(SESSION_MAGIC):
        raise CliError(f"{path} is not a kvcompose chat session")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise CliError(f"{path} is corrupt (checksum mismatch)")
    version, header_bytes = struct.unpack_from("<II", body, len(SESSION_MAGIC))
    if version not in SESSION_VERSIONS_READ:
        raise CliError(f"{path} is a version {version} session; this kvcompose reads versions "
                       + ", ".join(map(str, SESSION_VERSIONS_READ)))
    try:
        header = json.loads(body[fixed : fixed + header_bytes])
        n_tokens, n_vocab, state_bytes = header["n_tokens"], header["n_vocab"], header["state_bytes"]
        n_memory = header.get("memory_entries", 0)
        offset = fixed + header_bytes
        sizes = (4 * n_tokens, 4 * n_vocab, 8 * n_memory, 4 * n_memory, state_bytes)
        if offset + sum(sizes) != len(body):
            raise ValueError("section sizes do not add up")
        starts = np.cumsum((offset,) + sizes[:-1])
        input_ids = np.frombuffer(body, np.int32, n_tokens, starts[0])
        last_logits = np.frombuffer(body, np.float32, n_vocab, starts[1])
        memory = (np.frombuffer(body, np.int64, n_memory, starts[2]).copy(),
                  np.frombuffer(body, np.float32, n_memory, starts[3]).copy())
        blob = body[starts[4] :]
        state = llama_cpp.LlamaState(
            input_ids=input_ids.astype(np.intc),
            scores=last_logits.reshape(1, -1).copy(),
            n_tokens=n_tokens,
            llama_state=blob,
            llama_state_size=len(blob),
            seed=header["seed"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(f"{path} is malformed: {exc}") from None
    if header["kv_compressed_upto"] is not None:
        state.kv_compressed_upto = header["kv_compressed_upto"]
        state.kv_position_offset = header.get("kv_position_offset", 0)
        if header.get("kv_reread_upto") is not None:
            state.kv_reread_upto = header["kv_reread_upto"]
            state.kv_score_memory = memory
    return header, state


def load_session(session: ChatSession, path: str) -> None:
    """Continue the session saved in `path`: its options, conversation and cache.

    A file that cannot be loaded leaves the running session exactly as it was.
    """
    import numpy as np

    header, state = read_session(path)
    options = header["options"]
    current = {k: getattr(session.args, k) for k in _SESSION_OPTIONS}
    llm = session.llm
    if options != current:
        llm = load_model(argparse.Namespace(**{**vars(session.args), **options}))
    try:
        if _model_file(llm) != header["model_file"]:
            raise CliError(f"{path} was saved with {header['model_file']}, not {_model_file(llm)}")
        if header["n_tokens"] and header["n_vocab"] != llm.n_vocab():
            raise CliError(f"{path} holds logits for {header['n_vocab']} tokens, the model has {llm.n_vocab()}")
        input_ids = np.zeros(len(llm.input_ids), dtype=np.intc)
        if state.n_tokens > len(input_ids):
            raise CliError(f"{path} holds {state.n_tokens} tokens, more than this model's history can")
        input_ids[: state.n_tokens] = state.input_ids
        state.input_ids = input_ids
        try:
            llm.load_state(state)
        except (ValueError, RuntimeError) as exc:  # StateFormatError is a ValueError
            raise CliError(f"could not load {path}: {exc}") from None
    except CliError:
        if llm is not session.llm:
            llm.close()
        raise
    if llm is not session.llm:
        session.llm.close()
        session.llm = llm
        session.args = argparse.Namespace(**{**vars(session.args), **options})
    session.messages = header["messages"]
    session.turn = header["turn"]


def _model_file(llm) -> str:
    return Path(llm.model_path).name


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
        if args.command == "bench":
            from .bench.end_to_end import run_bench_command

            return run_bench_command(args, argv)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "calibrate":
            return run_calibrate(args)
        return run_chat(args)
    except CliError as exc:
        print(f"kvcompose: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
