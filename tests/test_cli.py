"""`kvcompose chat`: non-interactive runs, status numbers, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from kvcompose_gguf import cli


def _chat(args: list[str], stdin: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvcompose_gguf.cli", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/model.gguf"], "no model file at /nonexistent/model.gguf"),
        (["--budget", "0"], "budget"),
        (["--budget", "1.5"], "must lie in (0, 1]"),
        (["--policy", "no-such-policy"], "policy 'no-such-policy'"),
        (["--cache-type-v", "q8_0", "--no-flash-attn"], "needs flash attention"),
    ],
)
def test_bad_options_are_one_line_errors(args, message):
    result = _chat(args, stdin="")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_json_turns_report_the_conversation(tiny_model_path):
    result = _chat(
        [str(tiny_model_path), "--policy", "none", "--json", "--max-tokens", "8", "--temperature", "0", "--n-ctx", "512"],
        stdin="first question\nsecond question\n",
    )
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    assert all(t["n_ctx"] == 512 for t in turns)
    # The history only grows: the second turn re-sends the first and extends it.
    assert 0 < turns[0]["logical_tokens"] < turns[1]["logical_tokens"] <= 512
    assert all(t["reply_tokens"] <= 8 for t in turns)


def test_kv_bytes_agree_with_llama_cpp_buffer_report(tiny_model_path, capfd):
    import llama_cpp

    for type_name in ("f16", "q8_0"):
        llm = llama_cpp.Llama(
            model_path=str(tiny_model_path),
            n_ctx=512,
            flash_attn=True,
            type_k=cli._ggml_type(type_name),
            type_v=cli._ggml_type(type_name),
            verbose=True,
        )
        log = capfd.readouterr().err
        reported = re.findall(r"KV buffer size\s*=\s*([0-9.]+) MiB", log)
        assert reported, "llama.cpp did not log its KV buffer size"
        assert cli.kv_bytes_allocated(llm) / 2**20 == pytest.approx(sum(map(float, reported)), abs=0.01)
        llm.close()


def test_stock_overflow_is_reported_and_the_session_goes_on(tiny_model_path):
    long_turn = "tell me everything " * 20
    result = _chat(
        [str(tiny_model_path), "--policy", "none", "--json", "--max-tokens", "4", "--temperature", "0", "--n-ctx", "256"],
        stdin=f"{long_turn}\n{long_turn}\n/reset\nshort\n",
    )
    assert result.returncode == 0, result.stderr
    assert "exceed context window" in result.stderr
    assert "Traceback" not in result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert turns[-1]["turn"] == 1  # after /reset the conversation starts over and answers


def test_compressed_chat_goes_past_n_ctx_and_reports_it(tiny_model_path):
    from kvcompose_gguf.llama import Llama

    turn = "please remember this sentence about foxes and dogs " * 3
    result = _chat(
        [str(tiny_model_path), "--policy", "kvcompose", "--json", "--max-tokens", "8", "--temperature", "0",
         "--n-ctx", "256", "--budget", "0.5"],
        stdin=f"{turn}\n" * 4,
    )
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    last = turns[-1]
    assert last["logical_tokens"] > 256 >= last["cells_used"]
    assert last["compressions"] >= 1 and len(last["layer_budgets"]) == 4
    # The full-cache figure is the allocated bytes per cell times the logical tokens.
    llm = Llama(model_path=str(tiny_model_path), n_ctx=256, verbose=False, flash_attn=True)
    per_cell = cli.kv_bytes_allocated(llm) // 256
    assert last["kv_bytes_allocated"] == per_cell * 256
    assert last["kv_bytes_full_cache"] == per_cell * last["logical_tokens"]


def test_sparkline_scales_to_the_largest_value():
    assert cli.sparkline([0, 50, 100]) == "▁▅█"
