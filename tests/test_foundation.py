"""The patched build, the ABI probe, the models and the tiny fixtures."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kvcompose_gguf
from kvcompose_gguf import models, native
from numpy_reference import forward, load_weights
from tiny_models import TinyConfig

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build_patched_llama.py"


def _load_build_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_patched_llama", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_library_abi_version_matches_the_header():
    header = (REPO / "native" / "llama-kvcompose.h").read_text()
    declared = int(re.search(r"#define LLAMA_KVCOMPOSE_ABI_VERSION (\d+)", header).group(1))
    assert native.check_library(native.load()) == declared == native.ABI_VERSION


def test_installed_wheel_is_built_from_these_patches_and_sources():
    build = _load_build_script()
    installed = importlib.metadata.version("llama-cpp-python")
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        pytest.skip("LLAMA_CPP_LIB_PATH overrides the installed library; the wheel version says nothing about it")
    assert installed == build.local_version(build.build_key())


def test_build_key_changes_with_flags_and_is_stable_otherwise(monkeypatch):
    build = _load_build_script()
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    key = build.build_key()
    assert build.build_key() == key
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    assert build.build_key() != key


def test_build_key_follows_the_cpu_of_a_native_build_only(monkeypatch):
    build = _load_build_script()
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    if sys.platform.startswith("linux"):
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features")))
        assert build.cpu_features() == flags.split(":", 1)[1].strip()
    key = build.build_key()
    monkeypatch.setattr(build, "cpu_features", lambda: "another cpu")
    assert build.build_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_NATIVE=OFF")
    assert build.cpu_features() == "portable"


def test_library_has_no_amx_kernels_where_the_cpu_has_amx():
    import llama_cpp

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "amx_int8" not in cpuinfo.read_text():
        pytest.skip("this CPU has no AMX: a native build could not have compiled ggml's AMX kernels")
    # they segfault in the first decode of a Q4_1 model on Sapphire Rapids (upstream issue 20824)
    assert "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode()


def test_build_key_follows_the_native_sources_not_their_documentation(monkeypatch, tmp_path):
    import shutil

    build = _load_build_script()
    native = tmp_path / "native"
    shutil.copytree(build.NATIVE_DIR, native)
    monkeypatch.setattr(build, "NATIVE_DIR", native)
    key = build.build_key()
    (native / "README.md").write_text("edited\n")
    assert build.build_key() == key
    source = next(native.glob("*.cpp"))
    source.write_text(source.read_text() + "\n// edited\n")
    assert build.build_key() != key


def test_second_setup_reuses_the_cached_wheel():
    build = _load_build_script()
    if not list((build.default_cache_dir() / "wheels" / build.build_key()).glob("*.whl")):
        pytest.skip("no cached wheel for these sources (the library under test was built another way)")
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--no-install"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "reusing cached wheel" in result.stdout
    assert "applying" not in result.stdout  # nothing was unpacked, patched or built


def test_stock_library_is_rejected_with_the_fix_command():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))  # a real library without our symbol
    with pytest.raises(native.LibraryNotPatchedError, match=re.escape(native.FIX_COMMAND)):
        native.check_library(libc)


def test_other_abi_version_is_rejected():
    class Probe:
        argtypes = None
        restype = None

        def __call__(self):
            return native.ABI_VERSION + 1

    class OtherBuild:
        llama_kvcompose_abi_version = Probe()

    with pytest.raises(native.LibraryNotPatchedError, match=f"ABI version {native.ABI_VERSION + 1}"):
        native.check_library(OtherBuild())


def test_import_without_a_usable_library_fails_cleanly(tmp_path):
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(tmp_path))  # an empty directory: no libllama at all
    result = subprocess.run(
        [sys.executable, "-c", "import kvcompose_gguf"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1  # an exception, not a signal
    assert "LibraryNotPatchedError" in result.stderr
    assert native.FIX_COMMAND in result.stderr


@pytest.mark.parametrize("flash_attn", [False, True])
def test_tiny_fixture_logits_match_numpy_forward(tiny_model_path, flash_attn):
    import llama_cpp

    tokens = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    llm = llama_cpp.Llama(
        model_path=str(tiny_model_path), n_ctx=64, logits_all=True, flash_attn=flash_attn, verbose=False
    )
    llm.eval(tokens)
    got = np.asarray(llm.scores[: len(tokens)], dtype=np.float32)
    want = forward(load_weights(tiny_model_path), TinyConfig(), tokens).logits
    # llama.cpp multiplies f16 weights with f16-rounded activations.
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0.02)
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) >= 0.9


def test_model_path_errors_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotInstalledError, match=re.escape(models.SMOLLM2.pip_install)):
        models.model_path()
    with pytest.raises(models.ModelNotInstalledError, match="known model names"):
        models.model_path("/nonexistent/model.gguf")


@pytest.mark.model
def test_default_model_generates_text(default_model_path):
    import llama_cpp

    assert models.model_path() == default_model_path
    assert default_model_path.read_bytes()[:4] == b"GGUF"
    llm = llama_cpp.Llama(model_path=str(default_model_path), n_ctx=512, verbose=False, seed=0)
    reply = llm.create_chat_completion(
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ], max_tokens=24, temperature=0.0
    )
    assert "Paris" in reply["choices"][0]["message"]["content"]


@pytest.mark.gemma
def test_gemma3_is_assembled_from_its_wheels():
    try:
        path = models.model_path(models.GEMMA3.name)
    except models.ModelNotInstalledError as exc:
        pytest.skip(f"Gemma-3 packages not installed: {exc}")
    assert path.read_bytes()[:4] == b"GGUF"
    assert models.model_path(models.GEMMA3.name) == path  # assembled once, then reused


def test_package_exports():
    assert kvcompose_gguf.LibraryNotPatchedError is native.LibraryNotPatchedError
