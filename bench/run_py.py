"""`python run.py` as users run it, as a whole process, next to the floor: a bare aiohttp loop with a semaphore.

Every client is its own process pinned to core 0 (`taskset -c 0`); the fake server runs on core 1. Scenarios
(issue 17), each client measured from its own rusage (`os.wait4`):
  a. 200 ms latency, concurrency 100, 5,000 calls (ideal 500 calls/s): the floor, run.py direct, run.py litellm.
  b. a server limit of 6,000 requests/min (100/s), 3,000 calls: run.py with each transport, told that limit.
  c. 1 s latency, concurrency 100, 2,000 calls (ideal 100/s): run.py with the `openai_gpt4o_mini` preset's
     default transport.
run.py's rate is calls / the generate stage's seconds (from its manifest, warm-up waits included); the floor's is
calls / its loop's seconds. Also printed: CPU ms per call of the whole process (start-up and exit included), peak
RSS, CPU spent before the first request reached the server, and the wait between the last line the process
printed (the summary) and its exit.
Targets: a. direct >= 0.96 of ideal and >= 0.98 of the floor, <= 0.6 ms CPU/call, peak RSS <= 150 MB;
b. >= 0.97 of the limit with both transports, 429s <= 0.1 %; c. >= 0.97 of ideal. The median of `--repeat`
runs counts.

    .venv/bin/python bench/run_py.py [--quick] [--only a b c] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import CLIENT_CORE, MAX_TOKENS, ROOT, ServerProcess, fake_server, load_note, section, verdict, work_dir

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BENCH_KEY = "sk-bench-not-a-real-key"


@dataclass
class ChildRun:
    """One client process, measured from outside."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    first_request_cpu_s: float | None  # the child's CPU when the server saw its first request
    exit_lag_s: float  # from its last output line to its exit
    output: str
    rate: float = 0.0  # calls/s as the scenario defines it
    calls: int = 0

    @property
    def cpu_ms_per_call(self) -> float:
        return 1000 * self.cpu_s / max(1, self.calls)


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def run_child(cmd: list[str], server: ServerProcess, env: dict[str, str]) -> ChildRun:
    """Run `cmd` pinned to the client core; meter it with wait4 and watch the server for its first request."""
    server.reset()
    started = time.monotonic()
    proc = subprocess.Popen(
        ["taskset", "-c", str(CLIENT_CORE), *cmd],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    last_line_at = [started]

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            last_line_at[0] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    first_cpu: float | None = None
    while first_cpu is None and proc.poll() is None:
        cpu = _proc_cpu_s(proc.pid)  # read before asking the server: the request came no later than this
        if server.stats()["requests"] > 0:
            first_cpu = cpu
            break
        time.sleep(0.02)
    _, status, usage = os.wait4(proc.pid, 0)
    ended = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    return ChildRun(
        returncode=proc.returncode,
        wall_s=ended - started,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=usage.ru_maxrss / 1024,
        first_request_cpu_s=first_cpu,
        exit_lag_s=ended - last_line_at[0],
        output="".join(lines),
    )


def write_questions(path: Path, n: int) -> Path:
    with path.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": i + 1}) + "\n")
    return path


def run_py(
    server: ServerProcess, tmp: Path, tag: str, questions: Path, overrides: list[str], env: dict[str, str]
) -> ChildRun:
    """run.py into a fresh run folder (no response cache), its rate taken from the generate stage's seconds."""
    run_dir = tmp / f"run-{tag}"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={tmp / 'outputs'}",
        f"paths.cache_dir={tmp / f'cache-{tag}'}",
        f"ingest.path={questions}",
        f"model.api_base={server.api_base}",
        f"model.max_tokens={MAX_TOKENS}",
        "generate.cache=off",
        *overrides,
    ]
    child = run_child(cmd, server, env)
    if child.returncode != 0:
        raise RuntimeError(f"run.py exited {child.returncode}:\n{child.output[-3000:]}")
    generate = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]
    child.calls = int(generate["metrics"]["calls"])
    child.rate = child.calls / float(generate["seconds"])
    return child


def run_floor(server: ServerProcess, calls: int, concurrency: int, env: dict[str, str]) -> ChildRun:
    """This script in `--floor` mode: the bare aiohttp loop, as its own process."""
    cmd = [sys.executable, __file__, "--floor", server.api_base, str(calls), str(concurrency)]
    child = run_child(cmd, server, env)
    if child.returncode != 0:
        raise RuntimeError(f"the floor loop exited {child.returncode}:\n{child.output[-3000:]}")
    loop_s = float(json.loads(child.output.strip().splitlines()[-1])["loop_s"])
    child.calls = calls
    child.rate = calls / loop_s
    return child


async def floor_loop(api_base: str, calls: int, concurrency: int) -> None:
    """A bare aiohttp client with a semaphore: the same requests as run.py's, no pipeline around them."""
    import aiohttp

    window = asyncio.Semaphore(concurrency)
    url = f"{api_base}/chat/completions"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            body = {
                "model": "fake-model",
                "messages": [{"role": "user", "content": f"What is {i} + 1?"}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
            }
            async with window, session.post(url, json=body) as response:
                json.loads(await response.read())

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(calls)))
        print(json.dumps({"loop_s": time.perf_counter() - t0}))


def median_run(runs: list[ChildRun]) -> ChildRun:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def report(name: str, run: ChildRun, ideal: float, floor: ChildRun | None = None) -> None:
    first = f"{run.first_request_cpu_s:.2f} s" if run.first_request_cpu_s is not None else "?"
    vs_floor = f", {run.rate / floor.rate:.3f} of the floor" if floor is not None and floor is not run else ""
    print(
        f"{name}: {run.rate:.0f} calls/s = {run.rate / ideal:.3f} of ideal{vs_floor}; "
        f"{run.cpu_ms_per_call:.2f} ms CPU/call, peak RSS {run.peak_rss_mib:.0f} MB, CPU to first request {first}, "
        f"exit {run.exit_lag_s:.2f} s after its last line, wall {run.wall_s:.1f} s",
        flush=True,
    )


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC", "GEMINI", "HYDRA_"))}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "1"})
    return env


def latency_bound(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> None:
    calls, conc, latency_ms = args.calls_a, 100, 200.0
    ideal = conc / (latency_ms / 1000)
    section(f"a. latency-bound: {calls} calls, latency {latency_ms:.0f} ms, concurrency {conc} (ideal {ideal:.0f}/s)")
    questions = write_questions(tmp / "a.jsonl", calls)
    vllm = ["model=vllm", "model.name=hosted_vllm/fake-model", f"model.limits.concurrency={conc}"]
    runs: dict[str, list[ChildRun]] = {"floor": [], "direct": [], "litellm": []}
    print(load_note())
    with fake_server(latency_ms=latency_ms) as server:
        for i in range(args.repeat):
            runs["floor"].append(run_floor(server, calls, conc, env))
            for transport in ("direct", "litellm"):
                overrides = [*vllm, f"model.transport={transport}"]
                runs[transport].append(run_py(server, tmp, f"a-{transport}-{i}", questions, overrides, env))
    print(load_note())
    floor = median_run(runs["floor"])
    report("bare aiohttp loop (floor)", floor, ideal)
    for transport in ("direct", "litellm"):
        report(f"run.py, transport={transport}", median_run(runs[transport]), ideal, floor)
    direct = median_run(runs["direct"])
    of_ideal, of_floor = direct.rate / ideal, direct.rate / floor.rate
    print(f"direct achieved/ideal = {of_ideal:.3f}  (target >= 0.96: {verdict(of_ideal >= 0.96)})")
    print(f"direct / floor = {of_floor:.3f}  (target >= 0.98: {verdict(of_floor >= 0.98)})")
    cpu_ok = verdict(direct.cpu_ms_per_call <= 0.6)
    print(f"direct whole-process CPU/call = {direct.cpu_ms_per_call:.2f} ms  (target <= 0.6 ms: {cpu_ok})")
    rss_ok = verdict(direct.peak_rss_mib <= 150)
    print(f"direct peak RSS = {direct.peak_rss_mib:.0f} MB  (target <= 150 MB: {rss_ok})")
    first = direct.first_request_cpu_s if direct.first_request_cpu_s is not None else float("nan")
    print(f"direct CPU to first request = {first:.2f} s  (target <= 1 s: {verdict(first <= 1.0)})")


def rate_limited(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> None:
    calls, rps, burst, latency_ms = args.calls_b, 100.0, 20.0, 100.0
    section(f"b. server limit {rps * 60:.0f} requests/min (burst {burst:g}, latency {latency_ms:g} ms): {calls} calls")
    questions = write_questions(tmp / "b.jsonl", calls)
    limits = [
        "model=vllm",
        "model.name=hosted_vllm/fake-model",
        "model.limits.concurrency=100",
        f"model.limits.requests_per_minute={rps * 60:g}",
        f"model.limits.burst_seconds={burst / rps:g}",
    ]
    print(load_note())
    with fake_server(latency_ms=latency_ms, rps=rps, burst=burst) as server:
        for transport in ("direct", "litellm"):
            runs: list[tuple[ChildRun, float]] = []
            for i in range(args.repeat):
                overrides = [*limits, f"model.transport={transport}"]
                child = run_py(server, tmp, f"b-{transport}-{i}", questions, overrides, env)
                stats = server.stats()
                share_429 = int(stats["by_status"].get("429", 0)) / max(1, int(stats["requests"]))
                runs.append((child, share_429, child.calls / max(1e-9, float(stats["busy_s"] or 0))))
            child, share_429, busy_rate = sorted(runs, key=lambda r: r[0].rate)[len(runs) // 2]
            report(f"run.py, transport={transport}", child, rps)
            ok = verdict(child.rate / rps >= 0.97 and share_429 <= 0.001)
            print(
                f"{transport}: achieved/limit = {child.rate / rps:.3f}, 429s {100 * share_429:.2f} % of requests  "
                f"(target >= 0.97 and <= 0.1 %: {ok}); from the server's first request to its last answer "
                f"{busy_rate / rps:.3f} of the limit (the rest of the stage waited for the transport to start)"
            )
    print(load_note())


def preset_default(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> None:
    calls, conc, latency_ms = args.calls_c, 100, 1000.0
    ideal = conc / (latency_ms / 1000)
    section(f"c. openai_gpt4o_mini's default transport: {calls} calls, latency {latency_ms:.0f} ms, concurrency {conc}")
    questions = write_questions(tmp / "c.jsonl", calls)
    preset = [
        "model=openai_gpt4o_mini",
        f"model.limits.concurrency={conc}",
        "model.limits.requests_per_minute=null",
        "model.limits.input_tokens_per_minute=null",
    ]
    print(load_note())
    with fake_server(latency_ms=latency_ms) as server:
        runs = [
            run_py(server, tmp, f"c-{i}", questions, preset, {**env, "OPENAI_API_KEY": BENCH_KEY})
            for i in range(args.repeat)
        ]
    print(load_note())
    child = median_run(runs)
    report("run.py, model=openai_gpt4o_mini", child, ideal)
    print(f"achieved/ideal = {child.rate / ideal:.3f}  (target >= 0.97: {verdict(child.rate / ideal >= 0.97)})")


SCENARIOS = {"a": latency_bound, "b": rate_limited, "c": preset_default}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few calls, one run each")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS))
    parser.add_argument("--repeat", type=int, default=3, help="runs per client; the median counts")
    parser.add_argument("--calls-a", type=int, default=5000)
    parser.add_argument("--calls-b", type=int, default=3000)
    parser.add_argument("--calls-c", type=int, default=2000)
    parser.add_argument("--floor", nargs=3, metavar=("API_BASE", "CALLS", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.calls_a, args.calls_b, args.calls_c = 1, 1000, 500, 300
    return args


def main() -> None:
    args = parse()
    if args.floor:
        asyncio.run(floor_loop(args.floor[0], int(args.floor[1]), int(args.floor[2])))
        return
    env = base_env()
    with work_dir("run-py") as tmp:
        for name in args.only:
            SCENARIOS[name](args, tmp, env)


if __name__ == "__main__":
    main()
