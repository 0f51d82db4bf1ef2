"""`kvcompose chat`: non-interactive runs, status numbers, one-line errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

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
        (["/nonexistent/model.gguf", "--policy", "no-such-policy"], "policy 'no-such-policy'"),  # checked first
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
    assert last["compressions"] >= 1 and len(last["layer_budgets"]) == len(last["layer_allocation"]) == 4
    # The full-cache figure is the allocated bytes per cell times the logical tokens.
    llm = Llama(model_path=str(tiny_model_path), n_ctx=256, verbose=False, flash_attn=True)
    per_cell = cli.kv_bytes_allocated(llm) // 256
    assert last["kv_bytes_allocated"] == per_cell * 256
    assert last["kv_bytes_full_cache"] == per_cell * last["logical_tokens"]


def test_sparkline_scales_to_the_largest_value():
    assert cli.sparkline([0, 50, 100]) == "▁▅█"


# --- slash commands --------------------------------------------------------------------

TURN = "please remember this sentence about foxes and dogs " * 3
# At n_ctx 256 the protected cells (the system prompt and 64 recent tokens) are over a
# third of the cells: the budget must keep at least that much.
BUDGET = "0.75"


def _session(tiny_model_path, *options: str) -> "cli.ChatSession":
    args = cli.build_parser().parse_args(
        ["chat", str(tiny_model_path), "--n-ctx", "256", "--max-tokens", "8", "--temperature", "0", "--budget", BUDGET,
         *options]
    )
    return cli.ChatSession(cli.load_model(args), args.system, args.max_tokens, args.temperature, args=args)


def _say(session, text: str) -> tuple[str, dict]:
    session.reply(text, io.StringIO())
    return session.messages[-1]["content"], session.llm.kv_stats()


def test_stats_prints_the_per_layer_table_of_kv_stats(tiny_model_path, capsys):
    session = _session(tiny_model_path)
    for i in range(2):
        _say(session, f"{i} {TURN}")
    assert cli._slash_command("/stats", session) is None
    printed = capsys.readouterr().err
    kv = session.llm.kv_stats()
    rows = [line.split() for line in printed.splitlines() if re.fullmatch(r"\s*\d+\s+\d+\s+[0-9.]+\s+\d+", line)]
    assert [int(r[0]) for r in rows] == list(range(4))
    assert [int(r[1]) for r in rows] == kv["layer_budgets"]
    widest = max(kv["layer_budgets"])
    assert [float(r[2]) for r in rows] == pytest.approx([k / widest for k in kv["layer_budgets"]], abs=1e-3)
    assert [int(r[3]) for r in rows] == kv["layer_allocation"]
    stats = json.loads(printed[printed.index("{"):])
    assert {k: stats[k] for k in ("logical_tokens", "cells_used", "compressions")} == {
        k: kv[k] for k in ("logical_tokens", "cells_used", "compressions")
    }


def test_budget_reloads_the_model_and_keeps_the_conversation(tiny_model_path, capsys):
    session = _session(tiny_model_path)
    _, kv = _say(session, TURN[:60])  # two turns of this fit in n_ctx uncompressed
    assert kv["compressions"] == 0
    old = session.llm
    # The reply's bytes may tokenize differently when re-read: compare the prompt part only.
    history = [int(t) for t in old.input_ids[: kv["logical_tokens"] - 10]]
    messages = list(session.messages)
    cli._slash_command("/budget 0.7", session)
    assert session.llm is not old and session.args.budget == 0.7 and session.messages == messages
    _, kv = _say(session, "ok")
    # The new model read the kept conversation: its history starts with the old one's tokens.
    assert [int(t) for t in session.llm.input_ids[: len(history)]] == history
    assert kv["compressions"] == 0 and session.turn == 2
    # ... and compresses with the new budget: 0.7 of the (uncompressed) cells, over all layers.
    cells = kv["cells_used"]
    record = session.llm.compress()
    assert int(record.layer_allocation.sum()) == int(4 * cells * 0.7)
    for bad, message in (("/budget 1.5", "must lie in (0, 1]"), ("/budget", "needs a fraction")):
        kept = session.llm
        cli._slash_command(bad, session)
        assert message in capsys.readouterr().err and session.llm is kept and session.args.budget == 0.7


def test_policy_switches_between_stock_and_compressing(tiny_model_path, capsys):
    session = _session(tiny_model_path)
    long_turn = "tell me everything " * 40  # longer than n_ctx alone
    cli._slash_command("/policy none", session)
    with pytest.raises(cli.CliError, match="exceed context window"):
        session.reply(long_turn, io.StringIO())  # stock llama.cpp refuses it
    kept = session.llm
    cli._slash_command("/policy no-such-policy", session)
    assert "unknown policy 'no-such-policy'" in capsys.readouterr().err and session.llm is kept
    cli._slash_command("/policy snapkv", session)
    _, kv = _say(session, long_turn)
    assert kv["logical_tokens"] > 256 >= kv["cells_used"] and kv["compressions"] >= 1


def test_save_and_load_continue_the_compressed_session_exactly(tiny_model_path, tmp_path, capsys):
    session = _session(tiny_model_path)
    for i in range(2):
        _say(session, f"{i} {TURN}")
    saved_kv = session.llm.kv_stats()
    assert saved_kv["compressions"] >= 1
    saved_messages = list(session.messages)
    path = tmp_path / "chat.kvc"
    cli._slash_command(f"/save {path}", session)
    assert f"to {path}" in capsys.readouterr().err
    expected = _say(session, f"2 {TURN}")

    # A corrupt, a foreign and a missing file are one-line errors that change nothing;
    # so is an intact file whose cache state (checked by its own container) is corrupt.
    data = path.read_bytes()
    (tmp_path / "corrupt.kvc").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    (tmp_path / "foreign.kvc").write_bytes(b"not a session at all" * 4)
    body = bytearray(data[:-32])
    body[-40] ^= 1  # inside the state container, near its own checksum
    (tmp_path / "inner.kvc").write_bytes(bytes(body) + hashlib.sha256(body).digest())
    for name, message in (("corrupt.kvc", "checksum mismatch"), ("foreign.kvc", "not a kvcompose chat session"),
                          ("missing.kvc", "could not read"), ("inner.kvc", "could not load")):
        llm, messages = session.llm, list(session.messages)
        cli._slash_command(f"/load {tmp_path / name}", session)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert session.llm is llm and session.messages == messages

    # Loading into a session with other settings takes the file's settings with it.
    cli._slash_command("/budget 0.8", session)
    cli._slash_command(f"/load {path}", session)
    assert session.args.budget == float(BUDGET) and session.messages == saved_messages and session.turn == 2
    kv = session.llm.kv_stats()
    assert (kv["logical_tokens"], kv["cells_used"]) == (saved_kv["logical_tokens"], saved_kv["cells_used"])
    # The loaded cache (composite slots included) answers the next turn exactly as the original did.
    reply, kv = _say(session, f"2 {TURN}")
    assert reply == expected[0]
    assert (kv["logical_tokens"], kv["cells_used"]) == (expected[1]["logical_tokens"], expected[1]["cells_used"])


# --- the terminal ----------------------------------------------------------------------

STATUS = re.compile(
    r"\[turn (\d+) \| tokens (\d+) \| cells (\d+)/(\d+)(?: \| (\d+) compressions, last [0-9.]+ s)?"
    r" \| KV [0-9.]+ MiB \(full cache: [0-9.]+ MiB\)(?: \| allocation \S+)? \| (done|max tokens|interrupted)\]"
)


class _Terminal:
    """`kvcompose chat` on a pseudo-terminal: what a person at a keyboard sees and types."""

    def __init__(self, *args: str):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, with the pty as its controlling terminal
            try:
                os.execv(sys.executable, [sys.executable, "-m", "kvcompose_gguf.cli", "chat", *args])
            finally:
                os._exit(127)
        self.pending = b""

    def read_until(self, marker: bytes, timeout: float = 60) -> str:
        import select

        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout} s; the terminal shows {self.pending[-500:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the chat ended before {marker!r}: {self.pending[-500:]!r}")
            self.pending += chunk
        end = self.pending.index(marker) + len(marker)
        seen, self.pending = self.pending[:end], self.pending[end:]
        return seen.decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> int:
        import select

        try:
            self.type("/quit\r")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    return os.waitstatus_to_exitcode(status)
                # Drain the terminal: a child blocked writing to a full pty never exits.
                if select.select([self.fd], [], [], 0.1)[0]:
                    try:
                        os.read(self.fd, 4096)
                    except OSError:
                        pass
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            return -1
        finally:
            os.close(self.fd)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_terminal_chat_overflows_n_ctx_and_its_status_lines_agree_with_json(tiny_model_path):
    options = [str(tiny_model_path), "--n-ctx", "256", "--max-tokens", "8", "--temperature", "0", "--budget", BUDGET]
    turns = [f"{i} {TURN}" for i in range(3)]  # about 560 tokens: more than twice n_ctx
    terminal = _Terminal(*options)
    try:
        assert "policy kvcompose, n_ctx 256" in terminal.read_until(b"> ")
        shown = []
        for text in turns:
            terminal.type(text + "\r")
            screen = terminal.read_until(b"\n> ")
            match = STATUS.search(screen)
            assert match, f"no status line in {screen!r}"
            shown.append(match.groups())
        terminal.type("/help\r")
        assert "/budget X" in terminal.read_until(b"\n> ")
    finally:
        assert terminal.close() == 0

    scripted = _chat([*options, "--json"], stdin="".join(t + "\n" for t in turns))
    assert scripted.returncode == 0, scripted.stderr
    expected = [json.loads(line) for line in scripted.stdout.splitlines()]
    assert [(int(t), int(tok), int(c), int(n), int(k or 0)) for t, tok, c, n, k, _ in shown] == [
        (e["turn"], e["logical_tokens"], e["cells_used"], e["n_ctx"], e["compressions"]) for e in expected
    ]
    assert int(shown[-1][1]) > 256 >= int(shown[-1][2])  # past n_ctx, within its cells


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_ctrl_c_stops_the_reply_not_the_session(tiny_model_path):
    # A reply that could run for minutes. Ctrl-C follows Enter closely, so it lands while the
    # prompt is read or the first tokens are sampled, however fast this machine is.
    terminal = _Terminal(str(tiny_model_path), "--n-ctx", "256", "--max-tokens", "1000000", "--temperature", "0",
                         "--budget", BUDGET)
    try:
        terminal.read_until(b"> ")
        for turn in (1, 2):
            terminal.type(f"question {turn}\r")
            terminal.read_until(f"question {turn}\r\n".encode())  # the echoed Enter: the reply starts now
            time.sleep(0.05)
            terminal.type("\x03")
            match = STATUS.search(terminal.read_until(b"\n> "))
            assert match and match.group(1) == str(turn) and match.group(6) == "interrupted"
    finally:
        assert terminal.close() == 0
