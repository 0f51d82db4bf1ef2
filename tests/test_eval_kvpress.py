"""The kvpress reference mode of `kvcompose eval` (methods `kvpress:<press>`).

References: llama.cpp's own prompt and next-token logits for the same tokens (the
reference path reads the GGUF's weights faithfully), kvpress's own budget arithmetic
(`compute_n_kept`), and our policy's per-layer counts on the same context.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvcompose_gguf import cli
from kvcompose_gguf.eval import kvpress_reference, methods, runner, tasks

SYSTEM = runner.DEFAULT_SYSTEM


def _needs_reference():
    pytest.importorskip("torch", reason="the kvpress reference needs torch (pip install -e .[reference])")
    pytest.importorskip("kvpress", reason="the kvpress reference needs kvpress==0.5.5 (pip install -e .[reference])")
    pytest.importorskip("transformers", reason="the kvpress reference needs transformers (pip install -e .[reference])")


def _messages(sample) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sample.user_message()}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny_model_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def test_split_prompt_cuts_llama_cpps_own_prompt_where_the_question_starts(tokenizer):
    sample = tasks.generate("niah_single", 1, 200, seed=3)[0]
    context, rest = kvpress_reference.split_prompt(tokenizer, _messages(sample), sample.question)
    whole = kvpress_reference._captured_prompt(tokenizer, _messages(sample))
    assert context + rest == whole
    # the byte-level vocabulary detokenizes exactly (spaces as SentencePiece's U+2581):
    # the cut is right after the task's context
    def text(tokens):
        return tokenizer.detokenize(tokens).decode().replace("\u2581", " ")

    assert text(context).endswith(sample.context)
    assert text(rest).lstrip().startswith(sample.question)
    with pytest.raises(ValueError, match="ending with the question"):
        kvpress_reference.split_prompt(tokenizer, _messages(sample), "another question?")


def test_reference_full_cache_gives_llama_cpps_next_token_distribution(tiny_model_path, tokenizer):
    _needs_reference()
    import llama_cpp

    sample = tasks.generate("niah_single", 1, 60, seed=1)[0]
    context, rest = kvpress_reference.split_prompt(tokenizer, _messages(sample), sample.question)
    reference = kvpress_reference.ReferenceModel(tiny_model_path, "full", None, n_threads=1)
    try:
        theirs = reference.next_token_logits(context, rest)
        assert reference.layer_lengths() == [len(context) + len(rest)] * 4
    finally:
        reference.close()
    llm = llama_cpp.Llama(model_path=str(tiny_model_path), n_ctx=1024, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(context + rest)
        ours = np.array(llm.scores[llm.n_tokens - 1])
    finally:
        llm.close()
    # transformers computes the f16 weights in float32, llama.cpp in its own kernels: close, not equal
    assert np.corrcoef(ours, theirs)[0, 1] > 0.999
    np.testing.assert_allclose(theirs, ours, atol=0.02 * float(np.abs(ours).max()))


@pytest.mark.slow
def test_reference_kvcompose_keeps_kvpress_budget_and_matches_our_per_layer_counts(tiny_model_path):
    _needs_reference()
    from kvpress.utils import compute_n_kept

    config = runner.EvalConfig(model=str(tiny_model_path), methods=("kvcompose", "kvpress:kvcompose"),
                               tasks=("niah_single",), lengths=(200,), samples=1, ratios=(0.5,), n_threads=1)
    results = runner.run_eval(config, progress=False, command="test")
    ours_rec, theirs_rec = (next(r for r in results["records"] if r["method"] == m)
                            for m in ("kvcompose", "kvpress:kvcompose"))
    assert ours_rec["prompt_tokens"] == theirs_rec["prompt_tokens"], "the same tokens reach both"
    compressed = theirs_rec["compressed_layer_counts"]
    n_context = theirs_rec["context_tokens"]
    assert sum(compressed) == compute_n_kept(4 * n_context, 0.5)
    assert compressed[0] == max(compressed), "kvpress makes layer 0 the widest"
    # after the compression every layer took the same question and reply tokens
    grown = {slots - kept for slots, kept in zip(theirs_rec["layer_slots"], compressed)}
    assert len(grown) == 1 and grown.pop() >= theirs_rec["prompt_tokens"] - n_context
    assert theirs_rec["logical_entries"] == 2 * sum(theirs_rec["layer_slots"])

    agreement = results["agreement"]
    (accuracy,) = agreement["accuracy"]
    assert (accuracy["method"], accuracy["reference"], accuracy["task"]) == ("kvcompose", "kvpress:kvcompose", "niah_single")
    assert accuracy["difference_points"] == pytest.approx(100 * (ours_rec["score"] - theirs_rec["score"]))
    (budgets,) = agreement["layer_budgets"]
    assert budgets["kvpress"] == compressed and budgets["context_tokens"] == n_context
    assert budgets["our_observation"].startswith("repeat")
    # our policy on llama.cpp's attention, kvpress's on transformers': the same allocation up to rounding
    assert abs(budgets["total_ours"] - budgets["total_kvpress"]) <= 4
    assert budgets["mean_abs_difference_of_context"] <= 0.02
    assert budgets["ours_in_eval_layer_slots"] == ours_rec["layer_slots"]


def _write_gemma_header(path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(32768)
    writer.add_sliding_window(512)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gemma_is_refused_with_the_reason(tmp_path, capsys):
    path = tmp_path / "gemma-like.gguf"
    _write_gemma_header(path)
    with pytest.raises(methods.MethodUnavailableError, match="sliding-window layers hold only the last 512 tokens"):
        kvpress_reference.check_model(path)
    _needs_reference()
    assert cli.main(["eval", "--model", str(path), "--methods", "full,kvpress:kvcompose", "--tasks", "niah_single",
                     "--no-plots", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "every layer holds the whole context" in err and "Traceback" not in err


def test_reference_methods_refuse_what_they_cannot_run(tiny_model_path):
    _needs_reference()
    with pytest.raises(ValueError, match="QA tasks only, not kl"):
        runner.check_config(runner.EvalConfig(model=str(tiny_model_path), methods=("kvpress:full",), tasks=("kl",)))
    with pytest.raises(methods.UnknownMethodError, match="unknown kvpress press 'h2o'"):
        methods.get_method("kvpress:h2o")
    grid = runner.settings(runner.EvalConfig(methods=("kvpress:full", "kvpress:snapkv"), ratios=(0.25, 0.5),
                                             observe=("window", "repeat")))
    # no press runs once; a press once per ratio, observing its own way
    assert grid == [runner.Setting("kvpress:full", None, None), runner.Setting("kvpress:snapkv", 0.25, None),
                    runner.Setting("kvpress:snapkv", 0.5, None)]
    assert grid[1].kv_budget == 0.75
    assert kvpress_reference.make_press("snapkv", 0.25).compression_ratio == 0.25
