"""The browser review's server over real HTTP (no browser): the token and the POST checks, the label API writing
to the shared label log, server-side filters, search, sorting and paging, the LLM judge's verdicts and their
filter, the run and sweep pages, and the JSON paths the answer view marks. The browser itself is driven in
`test_review_browser.py`."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import jsonschema
import pytest
from conftest import ROOT, run_env, run_pipeline
from test_export import small_run
from test_review import LONG_RATIONALE, add_judgements
from test_validate import run_stage

from bench.review_web import make_run
from pipeline.config import Config
from pipeline.labels import LabelWriter, labels_folder, open_label_view
from pipeline.review.web_json import render_json
from pipeline.sweep import write_summary
from stages import validate

# A run of the shipped math experiment on the fake teacher, with a schema that most of its (right) answers
# fail ($.answer must be a multiple of 4): 14 answers, 9 invalid, 2 word problems mismatched (answered 0).
# export.require_match=false: the export keeps every valid answer, so what review labels remove is all that changes.
# The LLM judge (the fake's) grades the 5 valid answers: the 3 right ones pass, the 2 word problems fail.
WITH_JUDGE = "pipeline.stages=[ingest,generate,validate,judge,export]"
PIPELINE_ARGS = ("+experiment=math", "ingest.limit=14", "export.require_match=false", WITH_JUDGE)


def pipeline_args(schema: Path) -> tuple[str, ...]:
    return (*PIPELINE_ARGS, f"ingest.answer_schema_file={schema}")


def make_review_run(folder: Path) -> Path:
    schema = json.loads((ROOT / "data" / "math" / "answer_schema.json").read_text())
    schema["properties"]["answer"]["multipleOf"] = 4
    schema_path = folder / "answer_schema.json"
    folder.mkdir(parents=True, exist_ok=True)
    schema_path.write_text(json.dumps(schema))
    done = run_pipeline(folder / "run", *pipeline_args(schema_path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return folder / "run"


@pytest.fixture(scope="module", name="pipeline_run")
def shared_pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pipeline run per test module (the browser tests import these fixtures too)."""
    return make_review_run(tmp_path_factory.mktemp("review-run"))


@pytest.fixture(name="run_dir")
def fresh_run_dir(pipeline_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the run for each test, so labels never leak between tests."""
    shutil.copytree(pipeline_run.parent, tmp_path / "copy")
    return tmp_path / "copy" / "run"


@dataclass
class Server:
    process: subprocess.Popen[str]
    base: str
    token: str
    output: list[str]

    @property
    def url(self) -> str:
        return f"{self.base}/?token={self.token}"


@contextmanager
def review_server(run_dir: Path, reviewer: str = "alice", *extra: str) -> Iterator[Server]:
    """`python -m pipeline.review web` in a subprocess; stopped (SIGTERM, then kill) by its handle on the way out."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.review", "web", str(run_dir), "--reviewer", reviewer, "--port", "0", *extra],
        cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready.wait(60)
        match = re.search(r"(http://127\.0\.0\.1:\d+)/(?:run)?\?token=(\S+)", output[0] if output else "")
        assert match, f"no URL printed: {''.join(output)}"
        yield Server(process, match.group(1), match.group(2), output)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        reader.join(timeout=10)


def http(
    url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace"), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)


def label_records(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted(labels_folder(run_dir).glob("*.jsonl")) if labels_folder(run_dir).is_dir() else []
    records = [json.loads(line) for p in files for line in p.read_text().splitlines()]
    return sorted(records, key=lambda r: r["created_at"])


def latest(run_dir: Path) -> dict[str, tuple[bool, str, str | None]]:
    rel, _ = open_label_view(duckdb.connect(), run_dir)
    return {r[0]: (r[1], r[2], r[3]) for r in rel.fetchall()}


def list_page(server: Server, query: str) -> str:
    """The list page for these query parameters (`&name=value...`)."""
    status, html, _ = http(f"{server.base}/?token={server.token}{query}")
    assert status == 200, html
    return html


def response_ids(html: str) -> list[str]:
    return re.findall(r'<tr data-response-id="([0-9a-z]+)"', html)


# -- access: the token, POSTs with the header, this origin only -------------------------------------------


def test_requests_without_the_token_are_refused(run_dir: Path) -> None:
    with review_server(run_dir) as server:
        assert "review " in server.output[0] and "as alice" in server.output[0]
        status, text, _ = http(server.base + "/")
        assert status == 403 and "missing or wrong token" in text
        assert http(server.base + "/?token=" + "x" * len(server.token))[0] == 403
        assert http(server.base + "/run")[0] == 403 and http(server.base + "/static/review.js")[0] == 403
        status, html, headers = http(server.url)
        assert status == 200 and '<table id="answers">' in html
        assert f"review_token_{server.base.rsplit(':', 1)[1]}=" in headers["Set-Cookie"]
        assert "SameSite=Strict" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        cookie = {"Cookie": f"review_token_{server.base.rsplit(':', 1)[1]}={server.token}"}
        assert http(server.base + "/run", headers=cookie)[0] == 200, "the cookie stands for the token"

        rid = response_ids(html)[0]
        body = {"response_id": rid, "is_correct": True}
        status, text, _ = http(server.base + "/api/label", body, cookie)
        assert status == 403 and "X-Review-Token" in text, "a cookie alone never writes (no cross-site writes)"
        with_header = {**cookie, "X-Review-Token": server.token}
        status, text, _ = http(server.base + "/api/label", body, {**with_header, "Origin": "http://example.com"})
        assert status == 403 and "cross-site" in text
        rebound = {**with_header, "Host": "attacker.example:80"}
        assert http(server.base + "/api/label", body, rebound)[0] == 403, "DNS rebinding: a foreign Host"
        assert http(server.base + f"/answer/{rid}", body=None, headers={"X-Review-Token": server.token})[0] == 403
        assert label_records(run_dir) == [], "nothing refused was written"
        status, text, _ = http(server.base + "/api/label", body, {**with_header, "Origin": server.base})
        assert status == 200, text
    assert [(r["response_id"], r["is_correct"], r["reviewer"], r["source"]) for r in label_records(run_dir)] == [
        (rid, True, "alice", "web")
    ]


def test_the_server_listens_on_loopback_only(run_dir: Path) -> None:
    with review_server(run_dir) as server:
        port = int(server.base.rsplit(":", 1)[1])
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if listening.returncode != 0:
            pytest.skip("ss is not available to list listening sockets")
        lines = [line for line in listening.stdout.splitlines() if line.strip()]
        assert lines and all(f"127.0.0.1:{port}" in line for line in lines), lines


# -- the label API --------------------------------------------------------------------------------------


def post_label(server: Server, **body: Any) -> tuple[int, dict[str, Any]]:
    headers = {"X-Review-Token": server.token, "Content-Type": "application/json"}
    status, text, _ = http(f"{server.base}/api/label?token={server.token}", body, headers)
    return status, json.loads(text)


def test_labels_go_to_the_shared_log_with_what_undo_restores(run_dir: Path) -> None:
    with review_server(run_dir) as server:
        ids = response_ids(http(server.url)[1])
        tui = LabelWriter(run_dir, "tui")
        tui.append(ids[0], False, "bob", note="bob's view")  # another tool, another reviewer, the same folder
        tui.close()
        status, reply = post_label(server, response_id=ids[0], is_correct=True, note="  fine  ")
        assert status == 200 and reply["before"] == {"is_correct": False, "note": "bob's view"}
        assert reply["label"]["note"] == "fine" and reply["label"]["action"] == "label"
        status, reply = post_label(server, response_id=ids[0], is_correct=False, note="bob's view", action="undo")
        assert status == 200 and reply["before"] == {"is_correct": True, "note": "fine"}
        assert post_label(server, response_id=ids[1], is_correct="yes")[0] == 400
        assert post_label(server, response_id=ids[1], is_correct=True, action="delete")[0] == 400
        assert post_label(server, response_id="no-such-answer", is_correct=True)[0] == 404
        status, html, _ = http(f"{server.base}/answer/{ids[0]}?token={server.token}")
        assert status == 200
        reviewers = re.findall(r'<tr class="reviewer-label"><th>([^<]+)</th>', html)
        assert reviewers == ["bob", "alice (you)"], "each reviewer's latest label, oldest first"
    assert [(r["reviewer"], r["is_correct"], r["action"]) for r in label_records(run_dir)] == [
        ("bob", False, "label"), ("alice", True, "label"), ("alice", False, "undo"),
    ]  # fmt: skip
    assert latest(run_dir)[ids[0]] == (False, "alice", "bob's view")


# -- the list: filters, search, sorting, paging in DuckDB -----------------------------------------------


def test_list_filters_search_and_answer_neighbours(run_dir: Path) -> None:
    with review_server(run_dir) as server:
        page = partial(list_page, server)
        everything = response_ids(page(""))
        assert len(everything) == 14
        mismatched = page("&mismatched=1")
        assert len(response_ids(mismatched)) == 2 and mismatched.count("<td>word_problem</td>") == 2
        assert len(response_ids(page("&invalid=1"))) == 9
        assert len(response_ids(page("&category=subtraction&category=division"))) == 6
        assert len(response_ids(page("&q=365"))) == 1, "search in the question"
        assert len(response_ids(page("&q=COMPUTED+948"))) == 1, "search in the answer, any case"
        assert len(response_ids(page("&q=%27%3B+drop+table"))) == 0, "quotes are text, not SQL"
        post_label(server, response_id=everything[3], is_correct=False)
        assert response_ids(page("&labelled_by=alice")) == [everything[3]]
        assert everything[3] not in response_ids(page("&unreviewed=1"))
        by_score = response_ids(page("&sort=score"))
        assert set(by_score[:2]) == set(response_ids(mismatched)), "lowest score first"
        assert response_ids(page("&sort=labelled"))[0] == everything[3]

        # an answer's neighbours follow the view, and the answer just labelled under `unreviewed` keeps its place
        status, html, _ = http(f"{server.base}/answer/{everything[3]}?token={server.token}&unreviewed=1")
        assert status == 200
        assert f'data-next="/answer/{everything[4]}?unreviewed=1"' in html
        assert f'data-previous="/answer/{everything[2]}?unreviewed=1"' in html
        assert '<span id="total">13</span>' in html
        status, _, _ = http(f"{server.base}/answer/nope?token={server.token}")
        assert status == 404


def judge_cells(html: str) -> list[str]:
    """The judge column of a list page, as text."""
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r'<td class="judge"[^>]*>(.*?)</td>', html)]


def test_judge_verdicts_in_the_list_and_answer_pages_and_the_judge_filter(run_dir: Path) -> None:
    with review_server(run_dir) as server:
        page = partial(list_page, server)
        everything = page("")
        assert "<th>judge</th>" in everything and '<select name="judge" id="judge">' in everything
        cells = judge_cells(everything)
        assert sorted(cells) == sorted(["pass, score 1"] * 3 + ["fail, score 0"] * 2 + ["not judged"] * 9), cells
        failed = page("&judge=failed")
        assert response_ids(failed) == response_ids(page("&mismatched=1")), "the word problems answered 0"
        assert 'title="The answer 0 does not match the reference' in failed, "the rationale on hover"
        assert "judge failed" in failed and '<option value="failed" selected>' in failed
        passed = response_ids(page("&judge=passed"))
        assert len(passed) == 3 and len(response_ids(page("&judge=unjudged"))) == 9
        assert set(response_ids(page("&sort=judge"))[:2]) == set(response_ids(failed)), "lowest judge score first"
        assert response_ids(page("&judge=bogus")) == response_ids(everything), "an unknown choice filters nothing"

        post_label(server, response_id=passed[0], is_correct=False)  # the reviewer disagrees with the judge
        post_label(server, response_id=response_ids(failed)[0], is_correct=False)  # and agrees here
        assert response_ids(page("&judge=disagrees")) == [passed[0]]

        keep = f"?token={server.token}&judge=failed"
        status, html, _ = http(f"{server.base}/answer/{response_ids(failed)[0]}{keep}")
        assert status == 200
        verdict = re.search(r'<p id="judge-verdict">(.*?)</p>', html, re.S)
        assert verdict and re.sub(r"<[^>]+>|\s+", " ", verdict.group(1)).split() == ["fail,", "score", "0", "·", "fake"]
        rationale = re.search(r'<p id="judge-rationale">([^<]*)</p>', html)
        assert rationale and re.fullmatch(r"The answer 0 does not match the reference \d+\.", rationale.group(1))
        assert f'data-next="/answer/{response_ids(failed)[1]}?judge=failed"' in html, "the filter travels along"
        unjudged = response_ids(page("&judge=unjudged"))[0]
        status, html, _ = http(f"{server.base}/answer/{unjudged}?token={server.token}")
        assert '<p id="judge-verdict"><span class="dim">not judged</span>' in html


def test_answer_page_folds_a_long_rationale_and_says_why_there_is_no_verdict(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_stage(validate.STAGE, run_dir, Config(), small_run())
    add_judgements(run_dir)  # q1s1: failed, with a long rationale; q2s1: a verdict that broke its schema
    with review_server(run_dir) as server:
        status, html, _ = http(f"{server.base}/answer/q1s1?token={server.token}")
        assert status == 200
        folded = re.search(r'<details id="judge-rationale"><summary>(.*?)</summary><pre class="text">(.*?)</pre>', html)
        assert folded, "a long rationale is folded: its start shown, the whole on opening"
        assert folded.group(1).startswith("The answer 3 is not 2") and folded.group(1).endswith(" …")
        assert folded.group(2) == LONG_RATIONALE
        status, html, _ = http(f"{server.base}/answer/q2s1?token={server.token}")
        assert "no verdict (its reply broke the verdict schema)" in html and 'id="judge-rationale"' not in html
        status, html, _ = http(f"{server.base}/?token={server.token}&judge=unjudged")
        assert response_ids(html) == ["q2s0", "q2s1", "q3s0", "q4s0", "q4s1", "q5s0"]
        assert "no verdict (the judge&#39;s call failed)" in html


def test_paging_over_many_answers(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "big", 120, labels=12)
    with review_server(run_dir) as server:
        pages = []
        for number in (1, 2, 3):
            status, html, _ = http(f"{server.base}/?token={server.token}&page={number}")
            assert status == 200
            pages.append(response_ids(html))
        assert [len(p) for p in pages] == [50, 50, 20]
        status, html, _ = http(f"{server.base}/?token={server.token}")
        assert "<th>judge</th>" not in html and 'id="judge"' not in html, "no judgements: no judge column or filter"
        assert '<option value="judge"' not in html, "nor the judge's sort"
        status, html, _ = http(f"{server.base}/answer/{pages[0][0]}?token={server.token}")
        assert status == 200 and 'id="judge"' not in html
        assert len({rid for p in pages for rid in p}) == 120, "no answer twice, none missing"
        status, html, _ = http(f"{server.base}/?token={server.token}&page=2&invalid=1")
        assert 'id="prev-page" href="/?invalid=1"' in html.replace("&amp;", "&") and 'id="next-page"' not in html
        status, html, _ = http(f"{server.base}/?token={server.token}&sort=cost&page=oops")
        assert status == 200 and len(response_ids(html)) == 50, "a bad page number is page 1"


@pytest.mark.slow
def test_answer_view_shows_the_repair_chain(tmp_path: Path) -> None:
    folder = tmp_path / "repaired"
    folder.mkdir()
    schema = json.loads((ROOT / "data" / "math" / "answer_schema.json").read_text())
    schema["properties"]["answer"]["multipleOf"] = 4
    (folder / "schema.json").write_text(json.dumps(schema))
    stages = "pipeline.stages=[ingest,generate,repair,validate,export]"
    args = ("+experiment=math", "ingest.limit=4", f"ingest.answer_schema_file={folder / 'schema.json'}", stages)
    done = run_pipeline(folder / "run", *args, "repair.max_rounds=2")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rounds = duckdb.sql(
        f"SELECT response_id, root_response_id FROM '{folder / 'run' / 'tables' / 'validations.parquet'}' "
        "WHERE is_final AND round > 0"
    ).fetchall()
    assert rounds, "the fake teacher's first answers fail the schema, so some are repaired"
    final, root = rounds[0]
    with review_server(folder / "run") as server:
        status, html, _ = http(f"{server.base}/answer/{final}?token={server.token}")
        assert status == 200
        chain = html[html.index('<section id="chain">') :]
        assert re.findall(r"<h3>round (\d)", chain) == ["0", "1"]
        assert "is not a multiple of 4" in chain.split("<h3>round 1")[0], "round 0's errors"
        status, html, _ = http(f"{server.base}/answer/{root}?token={server.token}")
        assert status == 404, "only final answers are listed"


# -- the run page and a sweep's leaderboard -------------------------------------------------------------


def test_run_page_has_stages_and_accuracy_per_category(run_dir: Path) -> None:
    with review_server(run_dir) as server:
        status, html, _ = http(f"{server.base}/run?token={server.token}")
    assert status == 200
    stages = re.findall(r"<tr><td>(\w+)</td><td>done</td>", html)
    assert stages == ["ingest", "generate", "validate", "judge", "export"]
    assert "valid 35.7%" in html and "accuracy vs golden 85.7%" in html
    word = re.search(r"<tr><td>word_problem</td><td>2</td>\s*<td>100.0</td><td>0.0</td>", html)
    assert word, "per category: answers, valid %, accuracy %"
    assert re.search(r"<tr><td>export</td><td>done</td>\s*<td>exported 5</td>", html)
    assert re.search(r'<tr class="total"><td>\(all\)</td><td>14</td>\s*<td>35.7</td><td>85.7</td>', html)


def test_sweep_folder_shows_the_leaderboard_and_chart(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job, (valid, failure) in enumerate(((100.0, None), (None, "boom: the endpoint is down"))):
        (sweep / str(job)).mkdir(parents=True)
        manifest = {"model": {"preset": f"model{job}"}, "stages": {"validate": {"metrics": {"valid_pct": valid}}}}
        if failure:
            manifest["failure"] = failure
        (sweep / str(job) / "manifest.json").write_text(json.dumps(manifest))
    write_summary(sweep)
    with review_server(sweep) as server:
        assert "/run?token=" in server.output[0]
        status, html, _ = http(f"{server.base}/run?token={server.token}")
        assert status == 200
        assert "<th>job</th>" in html and "<td>model0</td>" in html and "boom: the endpoint is down" in html
        assert html.count('class="failed"') == 1
        cookie = {"Cookie": f"review_token_{server.base.rsplit(':', 1)[1]}={server.token}"}
        status, png, headers = http(f"{server.base}/sweep_summary.png?token={server.token}")
        assert status == 200 and headers["Content-Type"] == "image/png" and png.startswith("\ufffdPNG")
        status, listed, headers = http(f"{server.base}/?token={server.token}", headers=cookie)
        assert status == 200 and "leaderboard" in listed, "the list redirects to the leaderboard for a sweep folder"


def test_ctrl_c_stops_the_server_cleanly(run_dir: Path) -> None:
    with review_server(run_dir) as server:
        assert http(server.url)[0] == 200
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=30) == 0
    assert "review server stopped; every label is saved" in "".join(server.output)


# -- usage errors: one line, exit 2 ---------------------------------------------------------------------


def one_line_exit_2(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.review", "web", *args],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_web_usage_errors(run_dir: Path, tmp_path: Path) -> None:
    assert "not a validated run folder" in one_line_exit_2([str(tmp_path / "nowhere")])
    (tmp_path / "unfinished" / "0").mkdir(parents=True)
    (tmp_path / "unfinished" / "0" / "manifest.json").write_text("{}")
    assert "sweep_summary.parquet" in one_line_exit_2([str(tmp_path / "unfinished")])
    with review_server(run_dir) as server:
        port = server.base.rsplit(":", 1)[1]
        line = one_line_exit_2([str(run_dir), "--port", port])
        assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


# -- the answer view's JSON paths -----------------------------------------------------------------------


def test_rendered_paths_are_the_validators_paths() -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "number"},
            "steps": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}},
            "odd key": {"type": "string"},
        },
    }
    doc = {"answer": "7", "steps": [{"n": 1}, {"n": "two"}], "odd key": 3, "fine": [1, 2]}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    paths = {e.json_path for e in errors}
    assert paths == {"$.answer", "$.steps[1].n", "$['odd key']"}
    html = str(render_json(doc, paths))
    marked = set(re.findall(r'<span class="jv bad" data-path="([^"]+)">', html))
    assert {p.replace("&#39;", "'") for p in marked} == paths
    assert re.sub(r"<[^>]+>", "", html).replace("&#34;", '"').replace("&#39;", "'") == json.dumps(doc, indent=2)
    assert "<script>" not in str(render_json({"x": "<script>"}, set())), "text is escaped"


def test_every_page_file_ships_in_the_package() -> None:
    import fnmatch
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "pipeline" / "review"
    files = [
        p.relative_to(package).as_posix() for d in ("web_static", "web_templates") for p in (package / d).iterdir()
    ]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs["pipeline.review"]) for f in files), files


@pytest.mark.parametrize(("ci", "expected"), [("true", "CI needs the browser tests"), ("", "1 skipped")])
def test_browser_tests_without_a_browser_skip_locally_and_fail_in_ci(ci: str, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_review_browser.py", "-q", "-k", "token", "-p", "no:cacheprovider"],
        cwd=ROOT, env=run_env(CI=ci, DISTILLERY_CHROMIUM="/no/such/chromium"), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert (done.returncode != 0) == (ci == "true"), done.stdout[-2000:]
    assert expected in done.stdout and "DISTILLERY_CHROMIUM=/no/such/chromium does not exist" in done.stdout
