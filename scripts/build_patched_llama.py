#!/usr/bin/env python3
"""Build llama-cpp-python 0.3.36 with the kvcompose patch and install it.

Steps: fetch the pinned sdist from the package index (sha256 checked), apply
``patches/*.patch`` in order, copy ``native/`` into the vendored llama.cpp,
build a wheel labelled ``0.3.36+kvcompose.<key>`` and install it into the
Python that runs this script. The wheel is cached outside the checkout, keyed by
the pinned version, the patches, the native sources and the build flags, so a
second run with nothing changed installs the cached wheel without building.

Standard library only: this runs before anything else is installed.

    python scripts/build_patched_llama.py            # build (or reuse) and install
    python scripts/build_patched_llama.py --print-key
    CMAKE_ARGS="-DGGML_CUDA=on" python scripts/build_patched_llama.py
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import html.parser
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DEFAULT_INDEX = "https://pypi.org/simple"

# Only libllama and the ggml libraries go into the wheel; everything else in the
# vendored tree (common, tools, tests, the multimodal library) is left unbuilt.
BASE_CMAKE_ARGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]

REPO = Path(__file__).resolve().parent.parent
PATCH_DIR = REPO / "patches"
NATIVE_DIR = REPO / "native"
# Not part of the build: neither copied into llama.cpp nor in the cache key (a README
# edit must not rebuild the wheel).
NATIVE_NOT_BUILT = ("*.md", "__pycache__")
# Where native/ lands inside the vendored llama.cpp; the patch's CMake hunk globs it.
NATIVE_DEST = Path("vendor/llama.cpp/src/kvcompose")


def default_cache_dir() -> Path:
    env = os.environ.get("KVCOMPOSE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvcompose-gguf"


def log(msg: str) -> None:
    print(f"[kvcompose-build] {msg}", flush=True)


def _hash_tree(h: "hashlib._Hash", root: Path, pattern: str) -> None:
    for path in sorted(root.rglob(pattern)):
        if path.is_file() and not any(fnmatch.fnmatch(part, p) for part in path.relative_to(root).parts for p in NATIVE_NOT_BUILT):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")


def _x86_linux() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def platform_cmake_args() -> list[str]:
    """ggml's AMX int8 matrix kernels segfault in the first decode of a Q4_1 model on Sapphire
    Rapids CPUs (seen here; upstream llama.cpp issue 20824, closed without a fix), and
    GGML_NATIVE's -march=native compiles them in wherever the CPU has AMX. Every other
    native feature stays. A CMAKE_C_FLAGS / CMAKE_CXX_FLAGS in CMAKE_ARGS replaces this."""
    if not _x86_linux():
        return []
    return ["-DCMAKE_C_FLAGS=-mno-amx-int8", "-DCMAKE_CXX_FLAGS=-mno-amx-int8"]


def cmake_args() -> list[str]:
    user = os.environ.get("CMAKE_ARGS", "").split()
    return BASE_CMAKE_ARGS + platform_cmake_args() + user


def cpu_features() -> str:
    """What GGML_NATIVE tunes the library to: a wheel built for one CPU may not run on another
    (illegal instruction), so a cache shared between machines keys it by their features."""
    if any(arg.upper() in ("-DGGML_NATIVE=OFF", "-DGGML_NATIVE=0") for arg in cmake_args()):
        return "portable"
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def build_key() -> str:
    """Version, sdist hash, patches, native sources, flags, platform and CPU features."""
    h = hashlib.sha256()
    h.update(f"{PACKAGE}=={VERSION}\0{SDIST_SHA256}\0".encode())
    _hash_tree(h, PATCH_DIR, "*.patch")
    _hash_tree(h, NATIVE_DIR, "*")
    h.update(" ".join(cmake_args()).encode())
    h.update(f"\0{sys.platform}\0{platform.machine()}\0{cpu_features()}".encode())
    return h.hexdigest()[:12]


def local_version(key: str) -> str:
    return f"{VERSION}+kvcompose.{key}"


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def _index_urls() -> list[str]:
    urls = []
    for var in ("PIP_INDEX_URL", "UV_INDEX_URL"):
        if os.environ.get(var):
            urls.append(os.environ[var])
    urls.append(DEFAULT_INDEX)
    return urls


def fetch_sdist(cache: Path) -> Path:
    target = cache / "sdist" / SDIST_NAME
    if target.exists() and _sha256(target) == SDIST_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for index in _index_urls():
        page_url = index.rstrip("/") + f"/{PACKAGE}/"
        try:
            with urllib.request.urlopen(page_url, timeout=60) as resp:
                parser = _LinkParser()
                parser.feed(resp.read().decode("utf-8", "replace"))
            href = next(l for l in parser.links if l.split("#")[0].endswith("/" + SDIST_NAME) or l.split("#")[0] == SDIST_NAME)
            url = urllib.parse.urljoin(page_url, href.split("#")[0])
            log(f"downloading {url}")
            tmp = target.with_suffix(".part")
            with urllib.request.urlopen(url, timeout=600) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
            digest = _sha256(tmp)
            if digest != SDIST_SHA256:
                tmp.unlink()
                raise RuntimeError(f"sha256 mismatch for {url}: {digest}")
            tmp.replace(target)
            return target
        except Exception as exc:  # try the next index, report all at the end
            errors.append(f"{page_url}: {exc}")
    raise SystemExit("could not fetch the llama-cpp-python sdist:\n  " + "\n  ".join(errors))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_source(sdist: Path, workdir: Path, key: str) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data") if sys.version_info >= (3, 12) else tar.extractall(workdir)
    src = workdir / f"llama_cpp_python-{VERSION}"
    for patch in sorted(PATCH_DIR.glob("*.patch")):
        log(f"applying {patch.name}")
        subprocess.run(["patch", "-p1", "--forward", "--batch", "--silent", "-i", str(patch)], cwd=src, check=True)
    shutil.copytree(NATIVE_DIR, src / NATIVE_DEST, ignore=shutil.ignore_patterns(*NATIVE_NOT_BUILT))
    init = src / "llama_cpp" / "__init__.py"
    text = init.read_text()
    init.write_text(text.replace(f'__version__ = "{VERSION}"', f'__version__ = "{local_version(key)}"'))
    return src


def build_wheel(src: Path, out: Path) -> Path:
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(cmake_args())
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)]
    try:
        import scikit_build_core  # noqa: F401  (reuse it rather than fetch a build env)
        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    log("CMAKE_ARGS=" + env["CMAKE_ARGS"])
    subprocess.run(cmd, env=env, check=True)
    wheels = list(out.glob("llama_cpp_python-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel in {out}, found {wheels}")
    return wheels[0]


def installed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:
        return None


def install(wheel: Path, key: str) -> None:
    if installed_version() == local_version(key):
        log(f"{PACKAGE} {local_version(key)} already installed")
        return
    log(f"installing {wheel.name} (replaces any llama-cpp-python in this environment)")
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["--force-reinstall", "--no-deps", str(wheel)], check=True)
    # Runtime requirements of llama-cpp-python, installed without letting pip
    # re-resolve (and rebuild) llama-cpp-python itself.
    subprocess.run(pip + ["typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3"], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--no-install", action="store_true", help="build or reuse the wheel, print its path, install nothing")
    ap.add_argument("--force", action="store_true", help="rebuild even when a cached wheel exists")
    ap.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    args = ap.parse_args(argv)

    key = build_key()
    if args.print_key:
        print(key)
        return 0
    wheel_dir = args.cache_dir / "wheels" / key
    cached = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if cached and not args.force:
        wheel = cached[0]
        log(f"reusing cached wheel {wheel}")
    else:
        start = time.monotonic()
        sdist = fetch_sdist(args.cache_dir)
        with tempfile.TemporaryDirectory(prefix="kvcompose-build-") as tmp:
            src = prepare_source(sdist, Path(tmp), key)
            staging = Path(tmp) / "wheel"
            built = build_wheel(src, staging)
            wheel_dir.mkdir(parents=True, exist_ok=True)
            wheel = wheel_dir / built.name
            shutil.move(str(built), wheel)
        log(f"built {wheel.name} in {time.monotonic() - start:.0f} s")
    if args.no_install:
        print(wheel)
        return 0
    install(wheel, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
