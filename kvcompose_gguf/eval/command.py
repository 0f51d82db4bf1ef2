"""`kvcompose eval`: options, and writing results.json, results.md and the plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import methods, runner, texts


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, not {text!r}") from None

    return parse


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate methods x budgets on generated long-context tasks")
    p.add_argument("--model", default=None, help="GGUF path or known model name (default: smollm2-135m)")
    p.add_argument("--methods", type=_csv(str), default=("full",), help="comma-separated (default: full)")
    p.add_argument("--ratios", type=_csv(float), default=runner.KVPRESS_RATIOS,
                   help="kvpress compression ratios, kv_budget = 1 - ratio (default 0.25,0.5,0.75,0.9)")
    p.add_argument("--observe", type=_csv(str), default=("window",), help="observation modes (default: window)")
    p.add_argument("--tasks", type=_csv(str), default=runner.DEFAULT_TASKS,
                   help=f"comma-separated, from: {', '.join(runner.ALL_TASKS)} "
                   "(default: the generated QA tasks but variable_tracking and common_words)")
    p.add_argument("--lengths", type=_csv(int), default=(1024,), help="context lengths in tokens (default 1024)")
    p.add_argument("--samples", type=int, default=10, help="samples per task, length and setting (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama-cpp-python's)")
    p.add_argument("--text", choices=sorted(texts.TEXT_SOURCES), default="python-docs",
                   help="long real text: kl, and filler of qa_facts")
    p.add_argument("--kl-tokens", type=int, default=64, help="continuation tokens scored by kl (default 64)")
    p.add_argument("--chat-turns", type=int, default=6, help="filler turns in chat_recall (default 6)")
    p.add_argument("--out", type=Path, default=Path("eval-results"), help="output folder (default ./eval-results)")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_eval_command(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from kvcompose_gguf.cli import CliError

    config = runner.EvalConfig(
        model=args.model, methods=args.methods, ratios=args.ratios, observe=args.observe, tasks=args.tasks,
        lengths=args.lengths, samples=args.samples, seed=args.seed, n_threads=args.threads,
        chat_turns=args.chat_turns, long_text=args.text, kl_tokens=args.kl_tokens,
    )
    try:
        runner.check_config(config)
    except (methods.UnknownMethodError, methods.MethodUnavailableError, ValueError, KeyError,
            texts.TextNotAvailableError) as exc:
        raise CliError(str(exc)) from None
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("plots need matplotlib: pip install 'kvcompose-gguf[eval]' (or pass --no-plots)") from None
    from kvcompose_gguf import models

    try:
        models.model_path(config.model)
    except models.ModelNotInstalledError as exc:
        raise CliError(str(exc)) from None
    command = "kvcompose " + " ".join(sys.argv[1:] if argv is None else argv)
    results = runner.run_eval(config, progress=not args.no_progress, command=command)
    from . import report

    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "results.json")
    table = report.markdown(results)
    (args.out / "results.md").write_text(table, encoding="utf-8")
    written = [args.out / "results.json", args.out / "results.md"]
    if not args.no_plots:
        written += report.write_plots(results, args.out)
    print(table)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
