"""The browser review: a small local web app over one run folder (or a sweep folder's leaderboard).

Serves on 127.0.0.1 only. A random token, printed in the URL, guards every request: the first visit with
`?token=` sets a same-site cookie for this port, and every state-changing request is a POST that must also
carry the token in a header (which no other site can set), so a page elsewhere can neither read nor write.
Labels go to the same append-only log as the terminal review and the sheet import (`pipeline.labels`), one
line per decision, so the tools and several reviewers work on one folder at once and nothing is lost.
The pages use one small vendored script (`web_static/review.js`): nothing is fetched from anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from pipeline import layout
from pipeline.config import STAGE_ORDER
from pipeline.errors import UserError
from pipeline.labels import LabelWriter
from pipeline.review.items import JUDGE_FILTER_NAMES, judge_text, pretty_answer, short_rationale
from pipeline.review.web_data import PAGE_SIZE, ReviewData, View, is_sweep_folder, leaderboard
from pipeline.review.web_json import render_json

HERE = Path(__file__).resolve().parent
STATIC = HERE / "web_static"
HOST = "127.0.0.1"
TOKEN_HEADER = "X-Review-Token"
DATA: web.AppKey[ReviewData | None] = web.AppKey("data", ReviewData)
WRITER: web.AppKey[LabelWriter] = web.AppKey("writer", LabelWriter)
SETTINGS: web.AppKey[dict[str, Any]] = web.AppKey("settings", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "web_templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.globals.update(judge_text=judge_text, short_rationale=short_rationale)  # worded as the terminal review
SECURITY_HEADERS = {
    # Only this server's own files: no CDN, no inline script, no framing, no referrer carrying the token.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _refuse(reason: str) -> web.Response:
    return web.Response(status=403, text=f"refused: {reason}\n", headers=SECURITY_HEADERS)


def _cookie_name(settings: dict[str, Any]) -> str:
    return f"review_token_{settings['port']}"  # cookies ignore ports: one name per server


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request needs the token (query or cookie); a POST needs it in a header too, from this origin."""
    settings = request.app[SETTINGS]
    token: str = settings["token"]
    if request.host not in (f"{HOST}:{settings['port']}", f"localhost:{settings['port']}"):
        return _refuse(f"unexpected Host {request.host!r}")
    given = request.query.get("token") or request.cookies.get(_cookie_name(settings)) or ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        return _refuse("missing or wrong token: open the URL the review server printed")
    if request.method not in ("GET", "HEAD"):
        header = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(header.encode(), token.encode()):
            return _refuse(f"a change needs the {TOKEN_HEADER} header")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return _refuse(f"cross-site request from {origin}")
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    if "token" in request.query:
        response.set_cookie(_cookie_name(settings), token, httponly=True, samesite="Strict", path="/")
    return response


def _render(request: web.Request, template: str, **context: Any) -> web.Response:
    settings = request.app[SETTINGS]
    html = TEMPLATES.get_template(template).render(
        token=settings["token"], reviewer=settings["reviewer"], run_dir=settings["run_dir"], **context
    )
    return web.Response(text=html, content_type="text/html")


def _data(request: web.Request) -> ReviewData:
    data = request.app[DATA]
    if data is None:
        raise web.HTTPFound("/run")
    return data


def _query(pairs: list[tuple[str, str]]) -> str:
    return ("?" + urlencode(pairs)) if pairs else ""


async def list_view(request: web.Request) -> web.Response:
    data = _data(request)
    view = View.from_query(request.query)
    rows, total = data.page(view)
    pages = max(1, -(-total // PAGE_SIZE))
    keep = view.params(page=1)  # the view's filters and sort, carried into each answer's page
    return _render(
        request,
        "list.html",
        view=view,
        rows=rows,
        total=total,
        pages=pages,
        first=(view.page - 1) * PAGE_SIZE + 1,
        categories=data.categories(),
        labellers=data.labellers(),
        judged=data.judged,
        judge_filters=JUDGE_FILTER_NAMES,
        sorts=data.sorts(),
        keep=_query([p for p in keep if p[0] != "page"]),
        previous=_query(view.params(page=view.page - 1)) if view.page > 1 else None,
        next=_query(view.params(page=view.page + 1)) if view.page < pages else None,
        describe=view.filters.describe(),
    )


async def answer_view(request: web.Request) -> web.Response:
    data = _data(request)
    response_id = request.match_info["response_id"]
    try:
        item = data.item(response_id)
    except KeyError:
        raise web.HTTPNotFound(text=f"no final answer {response_id} in this run folder\n") from None
    view = View.from_query(request.query)
    around = data.neighbours(view, response_id)
    keep = _query([p for p in view.params() if p[0] != "page"])
    bad = {str(e["path"]) for e in item["errors"] or []}
    parsed = None
    if item["parsed"] is not None:
        with contextlib.suppress(json.JSONDecodeError, TypeError):
            parsed = render_json(json.loads(item["parsed"]), bad)
    chain = data.chain(item["root_response_id"]) if item.get("root_response_id") else []
    return _render(
        request,
        "answer.html",
        item=item,
        parsed=parsed,
        pretty=pretty_answer(item),
        chain=chain if len(chain) > 1 else [],
        labels=data.reviewers(response_id),
        judged=data.judged,
        around=around,
        keep=keep,
        list_url="/" + keep,
        previous=f"/answer/{around['previous']}{keep}" if around["previous"] else None,
        next=f"/answer/{around['next']}{keep}" if around["next"] else None,
    )


async def label(request: web.Request) -> web.Response:
    """Append one label: `{response_id, is_correct: true|false|null, note, action: label|undo}`.

    Answers with the label written and the answer's label before it (what an undo restores).
    """
    data = _data(request)
    try:
        body = await request.json()
        response_id = str(body["response_id"])
        value = body["is_correct"]
        note = body.get("note")
        action = body.get("action", "label")
    except (json.JSONDecodeError, KeyError, TypeError):
        return web.json_response({"error": "send JSON {response_id, is_correct, note, action}"}, status=400)
    if value not in (True, False, None) or action not in ("label", "undo") or not isinstance(note, str | None):
        return web.json_response({"error": "is_correct: true|false|null, note: text|null, action: label|undo"},
                                 status=400)  # fmt: skip
    if not data.known(response_id):
        return web.json_response({"error": f"no answer {response_id} in this run folder"}, status=404)
    before_value, before_note = data.current(response_id)
    settings = request.app[SETTINGS]
    record = request.app[WRITER].append(response_id, value, settings["reviewer"], (note or "").strip() or None, action)
    return web.json_response({"label": record, "before": {"is_correct": before_value, "note": before_note}})


async def run_view(request: web.Request) -> web.Response:
    data = request.app[DATA]
    if data is None:
        settings = request.app[SETTINGS]
        rows = leaderboard(Path(settings["run_dir"]))
        chart = layout.sweep_summary_path(Path(settings["run_dir"]), "png").is_file()
        return _render(request, "sweep.html", rows=rows, columns=list(rows[0]) if rows else [], chart=chart)
    manifest = data.manifest()
    stages = manifest.get("stages", {})
    order = sorted(stages, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER))
    return _render(
        request, "run.html", manifest=manifest, stages={n: stages[n] for n in order}, categories=data.per_category()
    )


async def sweep_chart(request: web.Request) -> web.FileResponse:
    path = layout.sweep_summary_path(Path(request.app[SETTINGS]["run_dir"]), "png")
    if request.app[DATA] is not None or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path)


async def static(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    path = STATIC / name
    if "/" in name or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path)


def make_app(run_dir: Path, reviewer: str, token: str, port: int) -> web.Application:
    """The app over a run folder (list, answers, labels, run page) or a sweep folder (its leaderboard)."""
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[SETTINGS] = {"run_dir": str(run_dir), "reviewer": reviewer, "token": token, "port": port}
    app[DATA] = None if is_sweep_folder(run_dir) else ReviewData(run_dir)
    if app[DATA] is None:
        leaderboard(run_dir)  # a sweep that never finished: one clear line now, not a broken page later
    app[WRITER] = LabelWriter(run_dir, source="web")
    app.router.add_get("/", list_view)
    app.router.add_get("/answer/{response_id}", answer_view)
    app.router.add_post("/api/label", label)
    app.router.add_get("/run", run_view)
    app.router.add_get("/sweep_summary.png", sweep_chart)
    app.router.add_get("/static/{name}", static)

    async def close(app: web.Application) -> None:
        app[WRITER].close()
        data = app[DATA]
        if data is not None:
            data.close()

    app.on_cleanup.append(close)
    return app


async def serve(run_dir: Path, reviewer: str, port: int = 0) -> None:
    """Serve until SIGINT or SIGTERM; prints the URL (with the token) as the first line of stdout."""
    token = secrets.token_urlsafe(24)
    app = make_app(run_dir, reviewer, token, port)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, port)
        try:
            await site.start()
        except OSError as exc:
            raise UserError(
                f"cannot listen on {HOST}:{port} ({exc.strerror}); pick another --port, or --port 0"
            ) from None
        bound = runner.addresses[0][1]
        app[SETTINGS]["port"] = bound
        start = "/" if app[DATA] is not None else "/run"
        print(f"review {run_dir} as {reviewer}: http://{HOST}:{bound}{start}?token={token}", flush=True)
        print("labels are saved at once to the run folder's labels/; Ctrl+C stops the server", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
    print("review server stopped; every label is saved", file=sys.stderr, flush=True)
