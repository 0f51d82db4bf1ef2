"""`kvcompose bench` end to end on a tiny model: the JSON's shape and its internal
consistency (KV bytes = cells x the per-cell bytes the GGUF's metadata implies, counts
against budgets, ratios against their own samples), never its timings."""

from __future__ import annotations

import json

import pytest

from kvcompose_gguf import cli

from tiny_models import TinyConfig, write_tiny_model

N_CTX_TRAIN = 600


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """The tiny llama with a 600-token training context, so that the bench must shorten a length."""
    return write_tiny_model(tmp_path_factory.mktemp("bench") / "tiny-600.gguf", TinyConfig(n_ctx_train=N_CTX_TRAIN))


def _f16_cell_bytes(config: TinyConfig) -> int:
    """K and V of one cell over all layers, f16: from the model's shape alone."""
    return config.n_layer * 2 * config.n_head_kv * config.head_dim * 2


def test_quick_bench_writes_consistent_json(short_context_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(short_context_model), "--quick", "--threads", "1", "--lengths", "600",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert json.loads(printed[: printed.rindex("}") + 1]) == report
    assert report["command"] == "kvcompose " + " ".join(argv)
    assert report["quick"] and report["repeats"] == 1 and report["decode_tokens"] == 8
    config = TinyConfig(n_ctx_train=N_CTX_TRAIN)
    n_layer, n_head_kv = config.n_layer, config.n_head_kv
    cell_bytes = _f16_cell_bytes(config)
    assert report["cell_bytes"] == cell_bytes
    assert report["n_ctx_train"] == N_CTX_TRAIN

    (row,) = report["lengths"]
    # 600 requested; the window (32) and the decoded tokens (8) must stay below the training context
    assert row["requested_tokens"] == 600 and row["logical_tokens"] == N_CTX_TRAIN - 32 - 8
    length = row["logical_tokens"]
    assert row["n_ctx"] >= 2 * length + 32 and row["n_ctx"] % 256 == 0
    assert row["kv_buffer_bytes"] == row["n_ctx"] * cell_bytes

    full = row["full_cache"]
    assert full["cells_used"] == length
    assert full["kv_bytes"] == length * cell_bytes
    assert full["logical_entries"] == n_layer * n_head_kv * length

    samples = row["samples"]
    prefill = row["prefill"]
    (off,), (on,) = samples["prefill_off"], samples["prefill_stats"]
    assert prefill["off"] == {"wall_s": off[0], "cpu_s": off[1]} and min(off) > 0
    assert prefill["stats_on"] == {"wall_s": on[0], "cpu_s": on[1]} and min(on) > 0
    for i, clock in enumerate(("wall", "cpu")):
        # the samples are rounded: on a fast (GPU) prefill that shows in the ratio
        assert prefill["stats_overhead_pct"][clock] == pytest.approx(100 * (on[i] / off[i] - 1), rel=1e-3, abs=0.05)
        assert prefill["tokens_per_s"][clock] == pytest.approx(length / off[i], rel=0.01)

    (budget,) = row["budgets"]
    assert budget["kv_budget"] == 0.5
    counts, allocation = budget["layer_counts"], budget["layer_allocation"]
    assert len(counts) == len(allocation) == n_layer
    # one global budget over the layers: half of every layer's tokens in all
    assert abs(sum(allocation) - n_layer * length // 2) <= n_layer
    # slots are compacted to the front: the widest layer sets the cells in use, which every
    # layer of the shared pool fills
    assert budget["cells_used"] == max(allocation) and counts == [max(allocation)] * n_layer
    assert budget["kv_bytes"] == budget["cells_used"] * cell_bytes
    assert budget["logical_entries"] == n_head_kv * sum(counts)
    assert budget["kv_bytes_free_after_compression"] == (row["n_ctx"] - budget["cells_used"]) * cell_bytes
    assert budget["physical_bytes_freed"] == (length - budget["cells_used"]) * cell_bytes

    window = budget["window_mode"]
    (total,), (decode,), (full_decode,) = budget["samples"]["total"], budget["samples"]["decode"], samples["full_decode"]
    for i, clock in enumerate(("wall_s", "cpu_s")):
        parts = window["observe"][clock] + window["select"][clock] + window["compact"][clock]
        assert 0 < parts <= window["total"][clock] + 1e-3
        assert window["total"][clock] == total[i]
    for i, clock in enumerate(("wall", "cpu")):
        assert window["overhead_pct_of_prefill"][clock] == pytest.approx(100 * total[i] / off[i], rel=0.01)
        assert budget["decode_speedup_vs_full"][clock] == pytest.approx(full_decode[i] / decode[i], rel=0.01)
        assert budget["decode_tokens_per_s"][clock] == pytest.approx(8 / decode[i], rel=0.01)
        assert report["target_met"][clock] == (window["overhead_pct_of_prefill"][clock] <= 10.0)

    compaction = budget["compaction"]
    assert compaction["bytes_moved"] == sum(counts) * cell_bytes // n_layer
    assert compaction["compact_s"] == pytest.approx(window["compact"]["wall_s"], abs=1e-5)
    assert compaction["ratio_to_copy"] == pytest.approx(compaction["compact_s"] / compaction["plain_copy_s"], rel=0.01)
    assert compaction["bytes_per_s"] == pytest.approx(compaction["bytes_moved"] / compaction["compact_s"], rel=0.01)

    for mode in ("lookahead", "repeat"):
        other = row[f"{mode}_mode"]
        assert other["kv_budget"] == 0.5 and other["observation"].startswith(mode)
        assert other["ratio_to_window_mode"]["wall"] == pytest.approx(other["total"]["wall_s"] / total[0], rel=0.01)
        # the continuation (decoded token by token) and the re-fed context are queries beyond the window
        assert other["observe"]["cpu_s"] > window["observe"]["cpu_s"]

    memory = row["memory"]
    assert 0 < memory["rss_before_context_bytes"] <= memory["peak_rss_bytes_so_far"]


@pytest.mark.parametrize(
    "options, message",
    [(["--budgets", "1.5"], "fractions kept"), (["--lengths", "10"], "at least 64"), (["--policy", "nope"], "unknown policy")],
)
def test_bench_refuses_bad_options_in_one_line(tiny_model_path, options, message, capsys):
    assert cli.main(["bench", "--model", str(tiny_model_path), "--quick", *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compaction_bench_reports_consistent_runs_and_the_in_place_form(tiny_model_path, tmp_path):
    """bench.compaction on the tiny model: bytes moved from the model's shape, the ratio from
    its own timings, and the staged in-place move on the CPU backend for every K and V."""
    from kvcompose_gguf.bench import compaction

    out = tmp_path / "compaction.json"
    argv = ["--model", str(tiny_model_path), "--cells", "1024", "--kept", "0.5", "--configs", "f16-fa",
            "--selections", "random", "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert compaction.main(argv) == 0
    (run,) = json.loads(out.read_text())["runs"]
    config = TinyConfig()
    assert run["slots"] == 512
    assert run["bytes_moved"] == 512 * _f16_cell_bytes(config)
    compact, copy = run["compact_ms"], run["copy_ms"]  # rounded to 0.001 ms, the ratio to 0.01
    assert (compact - 5e-4) / (copy + 5e-4) - 0.005 <= run["ratio"] <= (compact + 5e-4) / (copy - 5e-4) + 0.005
    # half kept: the sources are too dense for a direct gather to beat staging
    assert run["move_forms"] == {"in_place": 2 * config.n_layer, "chunks": 2 * config.n_layer, "direct_chunks": 0,
                                 "through_temporary": 0, "staged": 0, "transposed_v": 0}
