"""Per-model layer profiles (`kvcompose calibrate`): measured shares, the cache, the command."""

import json

import numpy as np
import pytest

from kvcompose_gguf import cli, profiles
from tests.tiny_models import TinyConfig, write_tiny_model

TOKENS, WINDOWS = 96, 2


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPOSE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def measured(tiny_model_path):
    return profiles.calibrate(tiny_model_path, (0.5, 0.25), tokens=TOKENS, windows=WINDOWS, n_threads=2)


def test_the_global_allocation_keeps_the_budget_spread_over_layers(measured):
    for budget, profile in measured.items():
        shares = np.asarray(profile.keep_fractions)
        assert shares.shape == (TinyConfig().n_layer,)
        assert np.all((shares > 0) & (shares <= 1))
        # KVCompose spends one global budget: the layers' shares average to it (the newest
        # token, always kept, and rounding add at most a couple of slots per window)
        assert abs(shares.mean() - budget) <= 3 / (TOKENS + 1)
        assert (profile.windows, profile.tokens, profile.text, profile.seed) == (WINDOWS, TOKENS, "python-docs", 0)
    assert np.all(np.asarray(measured[0.25].keep_fractions) <= np.asarray(measured[0.5].keep_fractions) + 1e-9)


def test_profiles_are_cached_per_model_file(tiny_model_path, measured, cache_dir, tmp_path):
    assert profiles.load(tiny_model_path) is None
    saved = profiles.save(tiny_model_path, measured)
    assert saved.parent == cache_dir / "profiles"
    assert profiles.load(tiny_model_path) == measured

    other = write_tiny_model(tmp_path / "other.gguf", TinyConfig(n_layer=2))
    assert profiles.load(other) is None  # another file, another key

    payload = json.loads(saved.read_text())
    saved.write_text(json.dumps({**payload, "version": profiles.PROFILE_VERSION + 1}))
    assert profiles.load(tiny_model_path) is None  # a format we do not read is stale, not an error
    del payload["profiles"][0]["seed"]
    saved.write_text(json.dumps(payload))
    assert profiles.load(tiny_model_path) is None  # a field missing: stale too
    saved.write_text("{ truncated")
    assert profiles.load(tiny_model_path) is None


def test_calibrate_command_measures_once_then_reads_the_cache(tiny_model_path, cache_dir, capsys):
    argv = ["calibrate", str(tiny_model_path), "--budgets", "0.5", "--tokens", str(TOKENS), "--windows", "1",
            "--threads", "2", "--json"]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    assert "saved:" in first.err
    shares = json.loads(first.out)["0.5"]["keep_fractions"]
    assert len(shares) == TinyConfig().n_layer

    assert cli.main(argv) == 0
    second = capsys.readouterr()
    assert "cached:" in second.err and "window 1/1" not in second.err
    assert json.loads(second.out)["0.5"]["keep_fractions"] == shares


@pytest.mark.parametrize("budgets", ["0.5,2", "0.5,1.5", "half"])
def test_calibrate_command_refuses_bad_budgets(tiny_model_path, cache_dir, capsys, budgets):
    assert cli.main(["calibrate", str(tiny_model_path), "--budgets", budgets]) == 2
    assert "kvcompose: error:" in capsys.readouterr().err
    assert not (cache_dir / "profiles").exists()
