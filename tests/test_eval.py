"""The evaluation harness: generators checked by re-parsing their text, scoring against
hand computations, reports, the method registry, and end-to-end runs (tiny model; one
smoke run on the default model)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest

from kvcompose_gguf import cli
from kvcompose_gguf.eval import methods, report, runner, scoring, tasks, texts

NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")


def _needles(context: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in NEEDLE.findall(context):
        found.setdefault(key, []).append(value)
    return found


# --- generators -------------------------------------------------------------------


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_generators_are_deterministic_under_seed(task):
    first = tasks.generate(task, 3, 400, seed=7)
    again = tasks.generate(task, 3, 400, seed=7)
    other = tasks.generate(task, 3, 400, seed=8)
    assert first == again
    assert [s.context for s in first] != [s.context for s in other]
    assert len({s.context for s in first}) == 3, "samples of one seed differ from each other"


@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("target", [300, 1500])
def test_generated_context_is_about_the_target_length(task, target):
    for sample in tasks.generate(task, 2, target, seed=1):
        n = tasks.word_count(sample.user_message())
        assert 0.75 * target <= n <= 1.25 * target, (task, n)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_single_needle_sits_at_the_stated_depth(depth):
    sample = tasks.niah(seed=3, index=0, target_tokens=1000, depth=depth)
    needle = re.search(NEEDLE, sample.context)
    assert needle is not None
    haystack = len(sample.context) - len(needle.group())  # depth is measured in the haystack alone
    realised = needle.start() / haystack
    # Needles go between filler sentences: off by at most one sentence.
    sentence = max(len(s) for s in tasks.NOISE) + 1
    assert abs(realised - depth) <= sentence / haystack + 1e-9
    assert sample.metadata["needle_depths"][needle.group()] == pytest.approx(realised, abs=2 / haystack)
    assert len(NEEDLE.findall(sample.context)) == 1


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_niah_answers_are_the_values_of_the_queried_keys_in_the_text(task):
    for sample in tasks.generate(task, 5, 800, seed=2):
        found = _needles(sample.context)
        queried = [k for k in found if k in sample.question]
        assert queried, "the question names a key that is in the text"
        expected = sorted(v for k in queried for v in found[k])
        assert sorted(sample.answers) == expected
        distractors = [k for k in found if k not in queried]
        if task == "niah_multikey":
            assert len(distractors) == 1
        if task == "niah_multivalue":
            assert len(found[queried[0]]) == 2
        if task == "niah_multiquery":
            assert len(queried) == 2


def test_niah_rejects_more_queries_than_keys():
    with pytest.raises(ValueError, match="n_queries"):
        tasks.niah(0, 0, 500, n_keys=1, n_queries=2)


def test_variable_tracking_answer_is_every_variable_holding_the_value():
    for sample in tasks.generate("variable_tracking", 5, 600, seed=4, n_chains=3, n_hops=3):
        value_of: dict[str, int] = {}
        for name, literal, source in re.findall(r"VAR ([A-Z]+) = (?:(\d+)|VAR ([A-Z]+))\.", sample.context):
            # An assignment reads a variable already defined above it.
            value_of[name] = int(literal) if literal else value_of[source]
        asked = int(re.search(r"assigned the value (\d+)", sample.question).group(1))
        assert sorted(sample.answers) == sorted(n for n, v in value_of.items() if v == asked)
        assert len(sample.answers) == 4
        assert len(value_of) == 12


@pytest.mark.parametrize("options", [{}, {"n_common": 1, "common_freq": 40, "rare_freq": 1}])
def test_common_words_answer_is_the_strictly_most_common_words_of_the_list(options):
    for sample in tasks.generate("common_words", 5, 700, seed=5, **options):
        words = re.findall(r"^\d+\. (\w+)$", sample.context, flags=re.MULTILINE)
        n = int(m.group(1)) if (m := re.search(r"the (\d+) most common", sample.question)) else 1
        counts = Counter(words).most_common()
        assert sorted(w for w, _ in counts[:n]) == sorted(sample.answers)
        assert counts[n - 1][1] > counts[n][1]
        numbers = [int(m) for m in re.findall(r"^(\d+)\. ", sample.context, flags=re.MULTILINE)]
        assert numbers == list(range(1, len(numbers) + 1))


def test_frequent_words_answer_is_the_strictly_most_frequent_coded_words():
    for sample in tasks.generate("frequent_words", 5, 700, seed=6):
        coded = sample.context.split("\n", 1)[1].split()
        counts = Counter(coded).most_common()
        assert [w for w, _ in counts[:3]] == list(sample.answers)
        assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]


PROFILE = re.compile(r"([A-Z][a-z]+ [A-Z][a-z]+) lives in (\w+) and works as a (\w+)\. \1's favourite object is the (\w+)\.")
FILLER = "Alpha beta gamma delta epsilon. Zeta eta theta iota kappa. " * 300


@pytest.mark.parametrize("options", [{}, {"filler_text": FILLER}, {"n_people": 5}, {"n_people": None}])
def test_qa_facts_answer_is_the_one_stated_fact(options):
    for sample in tasks.generate("qa_facts", 6, 700, seed=8, **options):
        profiles = {name: {"city": c, "job": j, "object": o} for name, c, j, o in PROFILE.findall(sample.context)}
        person = next(p for p in profiles if p in sample.question)
        attribute = {"live": "city", "work": "job", "object": "object"}[
            re.search(r"(live|work|object)", sample.question).group(1)
        ]
        assert (profiles[person][attribute],) == sample.answers
        assert sample.context.count(person) == 2, "one profile per person"
        n_people = options.get("n_people", 2)
        if n_people is None:
            assert len(profiles) > 20 and "grass" not in sample.context
        else:
            assert len(profiles) == n_people
            assert len({p.split()[0] for p in profiles}) == n_people, "first names tell people apart"
        if "filler_text" in options:
            assert "Zeta eta theta" in sample.context and "grass" not in sample.context


def test_qa_fact_depth_is_honoured():
    sample = tasks.qa_facts(seed=1, index=0, target_tokens=800, depth=0.25)
    profile = next(m for m in PROFILE.finditer(sample.context) if m.group(1) == sample.metadata["person"])
    haystack = len(sample.context) - sum(len(m.group()) + 1 for m in PROFILE.finditer(sample.context))
    before = profile.start() - sum(len(m.group()) + 1 for m in PROFILE.finditer(sample.context) if m.start() < profile.start())
    assert abs(before / haystack - 0.25) < 0.03


@pytest.mark.parametrize("filler", ["Alpha beta gamma delta epsilon. " * 400, None])
def test_chat_recall_asks_for_the_number_given_in_the_first_turn(filler):
    scenario = tasks.chat_recall(seed=0, index=1, target_tokens=600, filler_text=filler, n_turns=4)
    key, number = re.search(r"magic number for ([\w-]+) is: (\d{7})\.", scenario.turns[0]).groups()
    assert scenario.answers == (number,)
    assert key in scenario.question and number not in scenario.question
    assert len(scenario.turns) == 5
    assert all(number not in t and key not in t for t in scenario.turns[1:])
    total = sum(tasks.word_count(t) for t in scenario.turns[1:])
    assert 600 <= total <= 800
    assert scenario == tasks.chat_recall(seed=0, index=1, target_tokens=600, filler_text=filler, n_turns=4)


def test_chat_recall_can_mention_the_key_in_every_turn_without_its_number():
    plain = tasks.chat_recall(seed=0, index=1, target_tokens=600, n_turns=4)
    mentioned = tasks.chat_recall(seed=0, index=1, target_tokens=600, n_turns=4, mention_key=True)
    key, number = mentioned.metadata["key"], mentioned.answers[0]
    assert (mentioned.turns[0], mentioned.question, mentioned.answers) == (plain.turns[0], plain.question, plain.answers)
    for with_key, without in zip(mentioned.turns[1:], plain.turns[1:]):
        assert key in with_key and number not in with_key
        assert with_key.rsplit("\n", 1)[0] == without.rsplit("\n", 1)[0]  # the same passage


def test_unknown_task_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        tasks.generate("nope", 1, 100)


def test_long_texts_are_long_enough_for_kl():
    text = texts.long_text("python-docs")
    assert len(text) > 200_000
    assert text == texts.long_text("python-docs")


# --- scoring ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, answers, expected",
    [
        ("The number is 1234567.", ("1234567",), 1.0),
        ("The number is 91234567.", ("1234567",), 0.0),
        ("KETTLE, umbrella and a cat", ("kettle", "umbrella", "volcano"), 2 / 3),
        ("nothing here", ("a1",), 0.0),
        ("VAR ABCDE and FGHIJ", ("ABCDE", "FGHIJ"), 1.0),
    ],
)
def test_recall_counts_whole_word_matches(reply, answers, expected):
    assert scoring.recall(reply, answers) == pytest.approx(expected)


def test_recall_needs_an_answer():
    with pytest.raises(ValueError):
        scoring.recall("x", ())


def test_kl_divergence_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    p_logits = rng.normal(size=(3, 11)) * 3
    q_logits = rng.normal(size=(3, 11)) * 3
    got = scoring.kl_divergence(p_logits, q_logits)
    for row in range(3):
        zp = sum(math.exp(x) for x in p_logits[row])
        zq = sum(math.exp(x) for x in q_logits[row])
        expected = sum(
            math.exp(a) / zp * (math.log(math.exp(a) / zp) - math.log(math.exp(b) / zq))
            for a, b in zip(p_logits[row], q_logits[row])
        )
        assert got[row] == pytest.approx(expected, rel=1e-9)
    assert np.all(scoring.kl_divergence(p_logits, p_logits + 5.0) < 1e-12), "shift-invariant, zero on itself"
    with pytest.raises(ValueError, match="shapes"):
        scoring.kl_divergence(p_logits, q_logits[:2])


def test_negative_log_likelihood_picks_the_next_token():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    assert scoring.negative_log_likelihood(logits, np.array([1, 2])) == pytest.approx([math.log(4), -math.log(0.8)])


# --- methods and the grid ---------------------------------------------------------


def test_planned_and_unknown_methods_are_clear_errors():
    with pytest.raises(methods.MethodUnavailableError, match="kvpress.*not available.*Available: full, kvcompose"):
        methods.get_method("kvpress")
    with pytest.raises(methods.UnknownMethodError, match="unknown method 'bogus'; available: full, kvcompose"):
        methods.get_method("bogus")


def test_grid_runs_the_full_cache_once_and_labels_budgets_as_kvpress_ratios(monkeypatch):
    fake = methods.Method("fake", "test", create=None, kv_usage=None, compresses=True, observation_modes=("window", "repeat"))
    monkeypatch.setitem(methods._REGISTRY, "fake", fake)
    config = runner.EvalConfig(methods=("full", "fake"), observe=("window", "repeat"))
    grid = runner.settings(config)
    assert [s for s in grid if s.method == "full"] == [runner.Setting("full", None, None)]
    fake_settings = [s for s in grid if s.method == "fake"]
    assert len(fake_settings) == 8
    assert sorted({(s.ratio, s.kv_budget) for s in fake_settings}) == [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (0.9, 0.1)]
    with pytest.raises(ValueError, match="no observation mode 'task'"):
        runner.settings(runner.EvalConfig(methods=("fake",), observe=("task",)))


@pytest.mark.parametrize(
    "config, message",
    [
        (runner.EvalConfig(tasks=("niah_single", "nope")), "unknown task"),
        (runner.EvalConfig(samples=0), "samples"),
        (runner.EvalConfig(lengths=(10,)), "at least 64"),
    ],
)
def test_bad_configs_fail_before_running(config, message):
    with pytest.raises(ValueError, match=message):
        runner.check_config(config)


def test_cli_reports_unavailable_methods_in_one_line(capsys):
    assert cli.main(["eval", "--methods", "kvpress", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "method 'kvpress' is not available" in err
    assert "Traceback" not in err


# --- reports ----------------------------------------------------------------------


def _results() -> dict:
    base = {"observe": None, "n": 2, "prompt_tokens": 1000.0, "cells_used": 1010.0, "layer_slots": [1010.0] * 3}
    summary = [
        {**base, "method": "full", "ratio": None, "kv_budget": 1.0, "task": "niah_single", "length": 1024,
         "metric": "accuracy", "score": 1.0, "physical_bytes": 3 * 2**20, "logical_entries": 9090.0},
        {**base, "method": "full", "ratio": None, "kv_budget": 1.0, "task": "qa_facts", "length": 1024,
         "metric": "accuracy", "score": 0.5, "physical_bytes": 3 * 2**20, "logical_entries": 9090.0},
        {**base, "method": "fake", "ratio": 0.75, "kv_budget": 0.25, "observe": "window", "task": "niah_single",
         "length": 1024, "metric": "accuracy", "score": 0.5, "physical_bytes": 2**20, "logical_entries": 2000.0,
         "layer_slots": [500.0, 250.0, 100.0]},
        {**base, "method": "full", "ratio": None, "kv_budget": 1.0, "task": "kl", "length": 1024,
         "metric": "kl_nats", "score": 0.0, "nll": 2.5, "physical_bytes": 3 * 2**20, "logical_entries": 9090.0},
    ]
    meta = {"command": "kvcompose eval", "date": "2026-01-01 00:00 UTC", "machine": "test", "model": "m.gguf",
            "llama_cpp_python": "0", "seconds": 1.0, "long_text": "text", "config": {"seed": 0}}
    return {"meta": meta, "records": [], "summary": summary}


def test_markdown_tables_show_percentages_budgets_and_kv():
    text = report.markdown(_results())
    lines = text.splitlines()
    assert "| setting | niah_single@1024 | qa_facts@1024 | mean |" in lines
    assert "| full (no compression) | 100 | 50 | 75.0 |" in lines
    assert "| fake r=0.75 (kv_budget 0.25) obs=window | 50 | - | 50.0 |" in lines
    assert "| full (no compression) | 1024 | 0.0000 | 2.500 | 2 |" in lines
    assert "| full (no compression) | niah_single@1024 | 1000 | 1010 | 3.00 | 9090 |" in lines
    assert "Command: `kvcompose eval`" in text


def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plots are the optional 'eval' extra")
    paths = report.write_plots(_results(), tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_physical_kv.png", "accuracy_vs_logical_kv.png", "layer_budgets.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- end to end -------------------------------------------------------------------


def _bytes_per_cell_from_gguf(path) -> int:
    """K+V bytes of one f16 cell over all layers, from the file's own metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(suffix):
        key = next(k for k in reader.fields if k.endswith(suffix))
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    n_layer, n_head, n_head_kv, n_embd = (
        field(".block_count"), field(".attention.head_count"), field(".attention.head_count_kv"), field(".embedding_length"),
    )
    return n_layer * 2 * n_head_kv * (n_embd // n_head) * 2


def test_kl_run_on_the_tiny_model_splits_context_and_continuation_faithfully(tiny_model_path):
    import llama_cpp

    config = runner.EvalConfig(model=str(tiny_model_path), tasks=("kl",), lengths=(96,), samples=2, kl_tokens=12)
    results = runner.run_eval(config, progress=False, command="test")
    records = results["records"]
    assert [r["index"] for r in records] == [0, 1]
    # The reference against an independent single-eval run of the same window.
    tokenizer = llama_cpp.Llama(model_path=str(tiny_model_path), vocab_only=True, verbose=False)
    ctx = runner._Context(config, tiny_model_path, tokenizer, runner._Progress(0, False))
    window = runner._kl_windows(ctx, 96)[1]
    llm = llama_cpp.Llama(model_path=str(tiny_model_path), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(window)
    logits = np.array(llm.scores[97 : 97 + 11])
    nll = scoring.negative_log_likelihood(logits, np.array(window[98:])).mean()
    assert records[1]["nll"] == pytest.approx(nll, rel=1e-3)
    assert records[1]["score"] == 0.0 and records[1]["positions"] == 11
    assert records[1]["cells_used"] == len(window) == 1 + 96 + 12
    assert records[1]["physical_bytes"] == len(window) * _bytes_per_cell_from_gguf(tiny_model_path)


def test_qa_run_on_the_tiny_model_records_every_sample(tiny_model_path):
    config = runner.EvalConfig(model=str(tiny_model_path), tasks=("niah_single", "qa_facts"), lengths=(128,), samples=2)
    results = runner.run_eval(config, progress=False, command="test")
    assert [(r["task"], r["index"]) for r in results["records"]] == [
        ("niah_single", 0), ("niah_single", 1), ("qa_facts", 0), ("qa_facts", 1),
    ]
    for r in results["records"]:
        assert r["score"] == scoring.recall(r["reply"], r["answers"])
        assert r["prompt_tokens"] < r["cells_used"] <= r["prompt_tokens"] + runner.DEFAULT_REPLY_TOKENS
        assert r["layer_slots"] == [r["cells_used"]] * 4
    assert {(s["task"], s["n"]) for s in results["summary"]} == {("niah_single", 2), ("qa_facts", 2)}
    json.dumps(results)


def test_compressing_method_holds_its_budget_of_the_full_cells(tiny_model_path):
    config = runner.EvalConfig(model=str(tiny_model_path), methods=("full", "kvcompose"), tasks=("niah_single",),
                               lengths=(512,), samples=2, ratios=(0.5,))
    records = runner.run_eval(config, progress=False, command="test")["records"]
    full = [r for r in records if r["method"] == "full"]
    ours = [r for r in records if r["method"] == "kvcompose"]
    assert len(full) == len(ours) == 2
    for f, r in zip(full, ours):
        assert r["prompt_tokens"] == f["prompt_tokens"] > r["n_ctx"]  # the prompt did not fit: it was compressed
        assert r["n_ctx"] <= f["n_ctx"] * 0.5 + 64
        assert r["cells_used"] <= r["n_ctx"]
        assert r["physical_bytes"] * f["cells_used"] == f["physical_bytes"] * r["cells_used"]  # same bytes per cell
        # logical entries: every layer attends to at most the cells in use, 2 KV heads each
        assert max(r["layer_slots"]) <= r["cells_used"] and r["logical_entries"] == 2 * sum(r["layer_slots"])
        assert r["score"] == scoring.recall(r["reply"], r["answers"])


@pytest.mark.model
def test_smoke_full_cache_on_the_default_model_writes_json_and_markdown(default_model_path, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--tasks", "niah_single", "--lengths", "384", "--samples", "2", "--ratios", "0.5",
            "--out", str(out), "--no-plots", "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert len(records) == 2 and {r["method"] for r in records} == {"full"}
    for r in records:
        assert r["score"] == scoring.recall(r["reply"], r["answers"])
        assert r["physical_bytes"] == r["cells_used"] * _bytes_per_cell_from_gguf(default_model_path)
    # The full cache finds a single needle in 384 tokens: the prompt reached the model intact.
    assert sum(r["score"] for r in records) >= 1
    markdown = (out / "results.md").read_text()
    assert "| setting | niah_single@384 | mean |" in markdown
    assert markdown in capsys.readouterr().out
