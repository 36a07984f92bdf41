"""The browser review driven in a real headless Chromium through Playwright: the token, filtering (the LLM judge's
verdict too), labelling with keys and with the mouse, undo, notes, two reviewers at once, reload, the export
afterwards, a screenshot, and no request to any host but 127.0.0.1.

Playwright cannot download its own browser here: the tests launch Debian's `chromium-headless-shell` (or
`chromium`), which `.ci/run` installs. Without a browser they skip locally, and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import run_pipeline
from test_review_web import (  # the fixtures pipeline_run and run_dir: a fresh copy of one run per test
    fresh_run_dir,  # noqa: F401
    label_records,
    latest,
    pipeline_args,
    review_server,
    shared_pipeline_run,  # noqa: F401
)

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
FLAGS = [
    "--no-sandbox",  # we run as root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
]


def find_browser() -> tuple[str | None, str]:
    """The Chromium executable to launch, or why there is none."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "the playwright package is not installed (pip install -e '.[dev]')"
    given = os.environ.get("DISTILLERY_CHROMIUM")
    if given:
        return (given, "") if Path(given).is_file() else (None, f"DISTILLERY_CHROMIUM={given} does not exist")
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path, ""
    return None, "no Chromium found (apt-get install chromium-headless-shell, or set DISTILLERY_CHROMIUM)"


@pytest.fixture(scope="module", autouse=True)
def executable() -> str:
    """The browser, looked for before anything else is set up: a skip (locally) or a failure (CI=true) comes first."""
    path, reason = find_browser()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the browser tests: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def browser(executable: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def requests_seen() -> Iterator[list[str]]:
    """Every URL any page of the test asked for; at the end, none may leave 127.0.0.1."""
    seen: list[str] = []
    yield seen
    assert seen, "the test made no request at all"
    foreign = [u for u in seen if urlsplit(u).scheme not in ("data", "about") and urlsplit(u).hostname != "127.0.0.1"]
    assert foreign == [], f"requests to other hosts: {foreign}"


@pytest.fixture
def new_page(browser: Any, requests_seen: list[str]) -> Iterator[Any]:
    """Pages in fresh browser contexts (separate cookies and storage), each watched for its requests."""
    contexts: list[Any] = []

    def make() -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.on("request", lambda request: requests_seen.append(request.url))
        context.set_default_timeout(20_000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


def label_text(page: Any) -> str:
    return str(page.locator("#label").inner_text())


def position(page: Any) -> str:
    return str(page.locator("#position").inner_text())


def open_answer(page: Any, index: int) -> str:
    """From the list, click answer `index` (0-based); returns its response_id."""
    row = page.locator("#answers tbody tr").nth(index)
    rid = str(row.get_attribute("data-response-id"))
    row.locator("a.open").click()
    page.wait_for_url(f"**/answer/{rid}**")
    return rid


def press_and_wait(page: Any, key: str, url_part: str) -> None:
    with page.expect_navigation(url=f"**{url_part}**"):
        page.keyboard.press(key)


# -- scenarios --------------------------------------------------------------------------------------------


def test_open_with_the_token_and_refused_without(run_dir: Path, new_page: Any) -> None:
    with review_server(run_dir) as server:
        page = new_page()
        refused = page.goto(server.base + "/")
        assert refused is not None and refused.status == 403
        assert "missing or wrong token" in page.inner_text("body")
        opened = page.goto(server.url)
        assert opened is not None and opened.status == 200
        assert page.locator("#answers tbody tr").count() == 14
        assert page.locator("#reviewer").inner_text() == "alice"
        page.click("#nav-run")  # the cookie set by the first visit carries on: no token in the link
        page.wait_for_url("**/run")
        assert page.locator("#stages tbody tr").count() == 5  # judge included
        other = new_page()  # another browser (no cookie) with the token guessed wrong
        wrong = other.goto(f"{server.base}/?token={'A' * len(server.token)}")
        assert wrong is not None and wrong.status == 403


def test_filter_to_mismatched_answers_judge_verdicts_and_search(run_dir: Path, new_page: Any) -> None:
    with review_server(run_dir) as server:
        page = new_page()
        page.goto(server.url)
        with page.expect_navigation():
            page.check("input[name=mismatched]")  # a changed filter applies at once
        assert "mismatched=1" in page.url
        rows = page.locator("#answers tbody tr")
        assert rows.count() == 2
        assert page.locator("#answers tbody td:nth-child(2)").all_inner_texts() == ["word_problem", "word_problem"]
        assert page.locator("#total").inner_text() == "2"
        mismatched = [str(r.get_attribute("data-response-id")) for r in rows.all()]

        page.goto(server.base + "/")  # the judge's verdicts: filter on them, see them with the answer
        assert sorted(set(page.locator("#answers td.judge").all_inner_texts())) == [
            "fail, score 0", "not judged", "pass, score 1",
        ]  # fmt: skip
        with page.expect_navigation():
            page.select_option("#judge", "failed")
        assert "judge=failed" in page.url and page.locator("#total").inner_text() == "2"
        assert [str(r.get_attribute("data-response-id")) for r in rows.all()] == mismatched
        assert page.locator("#answers td.judge").all_inner_texts() == ["fail, score 0"] * 2
        open_answer(page, 0)
        verdict = page.locator("#judge-verdict")
        assert verdict.inner_text().startswith("fail, score 0") and "fake" in verdict.inner_text()
        assert verdict.locator("span.bad").count() == 1, "a failed verdict in the failure colour"
        assert page.locator("#judge-rationale").inner_text().startswith("The answer 0 does not match the reference")
        press_and_wait(page, "i", mismatched[1])  # labelling moves along the judge's filter
        assert page.locator("#position").inner_text() == "2" and "judge=failed" in page.url
        page.goto(server.base + "/")
        page.fill("#search", "nonexistent words")
        with page.expect_navigation():
            page.press("#search", "Enter")
        assert page.locator("#answers tbody tr").count() == 0
        page.goto(server.base + "/")  # cleared
        page.fill("#search", "365")
        with page.expect_navigation():
            page.press("#search", "Enter")
        assert page.locator("#answers tbody tr").count() == 1


def test_label_with_keys_and_mouse_undo_note_and_reload(run_dir: Path, new_page: Any) -> None:
    with review_server(run_dir) as server:
        page = new_page()
        page.goto(server.url)
        ids = [str(r.get_attribute("data-response-id")) for r in page.locator("#answers tbody tr").all()]
        assert open_answer(page, 0) == ids[0]
        assert position(page) == "1" and label_text(page) == "not reviewed"
        press_and_wait(page, "c", ids[1])  # key: correct, on to the next answer
        assert position(page) == "2"
        with page.expect_navigation(url=f"**{ids[2]}**"):
            page.click("#btn-incorrect")  # mouse: incorrect
        press_and_wait(page, "u", ids[1])  # undo goes back to the undone answer
        assert page.locator("#message").inner_text() == "undone" and label_text(page) == "not reviewed"
        page.keyboard.press("n")
        assert page.evaluate("document.activeElement.id") == "note"
        page.keyboard.type("wrong unit")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert page.locator("#message").inner_text() == "note saved"
        assert page.input_value("#note") == "wrong unit"
        press_and_wait(page, "i", ids[2])
        press_and_wait(page, "k", ids[1])  # previous
        assert label_text(page) == "incorrect" and page.input_value("#note") == "wrong unit"
        press_and_wait(page, "j", ids[2])  # next
        press_and_wait(page, "s", ids[3])  # skip labels nothing
        page.reload()
        assert position(page) == "4" and label_text(page) == "not reviewed"
        page.goto(server.base + f"/answer/{ids[0]}")
        assert label_text(page) == "correct"
        page.click("#back")
        labels = page.locator("#answers tbody td.label").all_inner_texts()
        assert labels[0].startswith("correct") and labels[1].startswith("incorrect") and "wrong unit" in labels[1]
        assert labels[2].startswith("not reviewed")
    assert [(r["response_id"], r["is_correct"], r["note"], r["action"]) for r in label_records(run_dir)] == [
        (ids[0], True, None, "label"),
        (ids[1], False, None, "label"),
        (ids[1], None, None, "undo"),
        (ids[1], None, "wrong unit", "label"),
        (ids[1], False, "wrong unit", "label"),
    ]
    assert latest(run_dir) == {ids[0]: (True, "alice", None), ids[1]: (False, "alice", "wrong unit")}


def test_undo_survives_a_reload(run_dir: Path, new_page: Any) -> None:
    with review_server(run_dir) as server:
        page = new_page()
        page.goto(server.url)
        first = open_answer(page, 0)
        second = str(page.locator("#answer").get_attribute("data-next")).split("/")[-1]
        press_and_wait(page, "i", second)
        page.reload()  # the undo stack is this tab's, and a reload keeps it
        press_and_wait(page, "u", first)
        assert label_text(page) == "not reviewed"
        page.keyboard.press("u")
        page.wait_for_function("document.getElementById('message').textContent === 'nothing to undo'")
    assert [(r["is_correct"], r["action"]) for r in label_records(run_dir)] == [(False, "label"), (None, "undo")]


def test_two_reviewers_label_at_once(run_dir: Path, new_page: Any) -> None:
    with review_server(run_dir, "alice") as alice_server, review_server(run_dir, "bob") as bob_server:
        alice, bob = new_page(), new_page()
        alice.goto(alice_server.url + "&category=subtraction")
        bob.goto(bob_server.url + "&category=subtraction")
        ids = [str(r.get_attribute("data-response-id")) for r in alice.locator("#answers tbody tr").all()]
        assert len(ids) == 4
        open_answer(alice, 0)
        open_answer(bob, 0)
        for i in range(3):  # both press their keys before either page has moved on
            with alice.expect_navigation(url=f"**{ids[i + 1]}**"), bob.expect_navigation(url=f"**{ids[i + 1]}**"):
                alice.keyboard.press("c")
                bob.keyboard.press("i" if i == 1 else "c")
        alice.reload()
        bob.goto(bob_server.base + f"/answer/{ids[1]}")
        shown = bob.locator("#reviewers tr.reviewer-label th").all_inner_texts()
        assert sorted(shown) == ["alice", "bob (you)"], "each reviewer sees the other's label"
    records = label_records(run_dir)
    by_reviewer = {who: [(r["response_id"], r["is_correct"]) for r in records if r["reviewer"] == who]
                   for who in ("alice", "bob")}  # fmt: skip
    assert by_reviewer == {
        "alice": [(ids[0], True), (ids[1], True), (ids[2], True)],
        "bob": [(ids[0], True), (ids[1], False), (ids[2], True)],
    }, "the log holds every label of both"
    assert len(list((run_dir / "labels").glob("*.jsonl"))) == 2, "one file per server process"


@pytest.mark.slow
def test_export_afterwards_honours_the_labels(run_dir: Path, new_page: Any) -> None:
    chat = run_dir / "export" / "openai_chat" / "train.jsonl"
    before = chat.read_text().splitlines()
    assert len(before) == 5, "the valid answers"
    with review_server(run_dir) as server:
        page = new_page()
        page.goto(server.url + "&invalid=0")
        rows = page.locator("#answers tbody tr")
        valid = [i for i in range(rows.count()) if rows.nth(i).locator("td:nth-child(5)").inner_text() == "valid"]
        rid = open_answer(page, valid[0])
        question = page.locator("#question").inner_text()
        page.click("#btn-incorrect")
        page.wait_for_url(lambda url: rid not in url)
    schema = run_dir.parent / "answer_schema.json"
    done = run_pipeline(run_dir, *pipeline_args(schema), "pipeline.stages=[export]")  # the README's re-export
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    after = chat.read_text().splitlines()
    assert len(after) == 4
    assert not any(json.dumps(question)[1:-1] in line for line in after)
    assert "| reviewed | 1 (0 correct, 1 incorrect, 1 reviewer(s)) |" in (run_dir / "export" / "README.md").read_text()


def test_answer_view_screenshot_is_not_blank(run_dir: Path, new_page: Any, tmp_path: Path) -> None:
    from PIL import Image

    with review_server(run_dir) as server:
        page = new_page()
        page.goto(server.url + "&invalid=1")
        open_answer(page, 0)
        marked = page.locator("#parsed .jv.bad")
        assert marked.count() == 1 and marked.get_attribute("data-path") == "$.answer"
        assert page.locator("#errors code.path").inner_text() == "$.answer"
        background = marked.evaluate("e => getComputedStyle(e).backgroundColor")
        assert background not in ("rgba(0, 0, 0, 0)", "transparent"), "the failing value is highlighted"
        assert "in /" in page.locator("#tokens").inner_text() and page.locator("#model").inner_text() == "fake"
        shot = tmp_path / "answer_view.png"
        page.screenshot(path=str(shot), full_page=True)
    image = Image.open(shot).convert("RGB")
    assert image.size[0] == 1280 and image.size[1] >= 600
    colors = image.getcolors(maxcolors=1 << 20) or []
    white = sum(count for count, rgb in colors if rgb == (255, 255, 255))
    assert len(colors) > 50, "text and colours, not a blank page"
    assert white < 0.97 * image.size[0] * image.size[1]
    assert any(rgb == (255, 241, 194) for _, rgb in colors), "the highlighted value (--mark) is on screen"
