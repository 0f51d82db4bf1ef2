"""Evaluation harness: seeded long-context tasks, methods x budgets, JSON/markdown/plots.

- tasks: RULER-style generators (needle variants, variable tracking, word
  extraction, QA over generated facts) and the chat-recall scenario;
- texts: long real text from installed packages (KL divergence, chat filler);
- methods: the registry of methods under test ("full" = stock llama.cpp ceiling);
- kvpress_reference: `kvpress:<press>` methods, the authors' presses through transformers
  on the same GGUF weights and samples, and the agreement report against ours;
- runner: the grid, progress bar, results document; scoring: recall and KL;
- report: markdown tables, JSON, plots; command: `kvcompose eval`.
"""

from .methods import (
    KvUsage,
    Method,
    MethodUnavailableError,
    UnknownMethodError,
    available_methods,
    get_method,
    register,
)
from .runner import EvalConfig, run_eval
from .tasks import TASKS, Sample, generate

__all__ = [
    "TASKS",
    "EvalConfig",
    "KvUsage",
    "Method",
    "MethodUnavailableError",
    "Sample",
    "UnknownMethodError",
    "available_methods",
    "generate",
    "get_method",
    "register",
    "run_eval",
]
