"""Hub-ready exports: the export folder loads with `datasets.load_dataset(folder)` (default config and named
ones), its README.md card passes `huggingface_hub`'s loaders, and `python -m pipeline.publish` checks everything
before any network call (a local server standing in for the Hub counts the requests it gets)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import ROOT, run_env, run_pipeline
from huggingface_hub import DatasetCard, DatasetCardData
from test_export import check_ok, exported, files_under, jsonl, many_questions
from test_validate import run_stage

from pipeline.card_hub import hub_line, with_hub_id
from pipeline.config import Config, ExportConfig, PromptConfig, SplitConfig
from pipeline.hub_record import open_hub_view, read_repo_id, write_repo_id
from pipeline.layout import HUB_RECORD
from stages import export
from stages.dataset_card import portable_command

FORMATS = ["openai_chat", "alpaca", "sharegpt", "csv", "json", "parquet"]
SPLITS = {"train": 0.5, "validation": 0.25, "test": 0.25}
STRING = {"dtype": "string", "_type": "Value"}
TOKEN = "hf_secret_token"  # the only token the stand-in Hub accepts


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An export of 40 questions x 2 samples in every format, split three ways, with a system prompt."""
    cfg = ExportConfig(formats=FORMATS, split=SplitConfig(**SPLITS))
    return exported(tmp_path_factory.mktemp("hub"), cfg, tables=many_questions(), prompt=PromptConfig(system="Add."))


def load(path: Path, cache: Path, config: str | None = None, builder_files: dict[str, str] | None = None) -> Any:
    """`datasets.load_dataset(path, config)` in a fresh offline process: split -> [rows, features, first row].
    With `builder_files`, `load_dataset(config, data_files=builder_files)` run inside `path`."""
    code = (
        "import json, sys, datasets\n"
        "a = json.loads(sys.argv[1])\n"
        "ds = datasets.load_dataset(a['path'], a['config'], data_files=a['files'], cache_dir=a['cache'])\n"
        "out = {k: [v.num_rows, v.features.to_dict(), v[0] if v.num_rows else None] for k, v in ds.items()}\n"
        "print(json.dumps(out))\n"
    )
    source = [config, None] if builder_files else [str(path), config]
    args = {"path": source[0], "config": source[1], "files": builder_files, "cache": str(cache / "datasets")}
    env = run_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(cache / "hf"))
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env, timeout=180, cwd=path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def card_of(run_dir: Path) -> DatasetCard:
    return DatasetCard.load(run_dir / "export" / "README.md")


# -- the folder loads the way Hub datasets do ------------------------------------------------------------


def test_default_config_and_its_splits(folder: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, metrics = folder
    assert metrics["splits"] == {"train": 40, "validation": 20, "test": 20}
    loaded = load(run_dir / "export", tmp_path)
    assert {split: rows for split, (rows, _, _) in loaded.items()} == metrics["splits"]
    features = loaded["train"][1]
    assert features == {"messages": {"feature": {"role": STRING, "content": STRING}, "_type": "List"}}
    assert [m["role"] for m in loaded["train"][2]["messages"]] == ["system", "user", "assistant"]
    assert loaded["train"][2] == jsonl(run_dir / "export" / "openai_chat" / "train.jsonl")[0]


def test_other_formats_by_name_with_the_cards_counts(folder: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, metrics = folder
    card = card_of(run_dir)
    body_counts = {s: int(n) for s, n in (line.strip("| ").split(" | ") for line in table_rows(card.text, "split"))}
    assert body_counts == metrics["splits"]
    alpaca = load(run_dir / "export", tmp_path, "alpaca")
    assert {s: v[0] for s, v in alpaca.items()} == body_counts
    assert alpaca["train"][1] == dict.fromkeys(("instruction", "input", "output", "system"), STRING)
    sharegpt = load(run_dir / "export", tmp_path, "sharegpt")
    assert sharegpt["test"][1] == {"conversations": {"feature": {"from": STRING, "value": STRING}, "_type": "List"}}
    table = load(run_dir / "export", tmp_path, "json")
    assert {s: v[0] for s, v in table.items()} == body_counts
    # no answer has a reviewer: without the card's features this column would load as null, not string
    assert table["validation"][1]["reviewer"] == STRING and table["validation"][2]["reviewer"] is None
    assert table["train"][1]["is_valid"] == {"dtype": "bool", "_type": "Value"}


def test_formats_another_builder_reads_are_listed_with_their_loader(
    folder: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """`datasets` picks one builder per dataset, so CSV and Parquet next to JSON Lines are not configs; the
    card says how to load them, and that works."""
    run_dir, metrics = folder
    card = card_of(run_dir)
    assert [c["config_name"] for c in card.data.configs] == ["openai_chat", "alpaca", "sharegpt", "json"]
    for fmt in ("csv", "parquet"):
        files = {s: f"{fmt}/{s}.{fmt}" for s in SPLITS}
        assert f'`load_dataset("{fmt}", data_files={files})`' in card.text
        loaded = load(run_dir / "export", tmp_path, fmt, files)
        assert {s: v[0] for s, v in loaded.items()} == metrics["splits"]


def test_a_tabular_default_makes_the_other_tabular_formats_configs(tmp_path: Path) -> None:
    run_dir, metrics = exported(tmp_path, ExportConfig(formats=["parquet", "openai_chat", "csv"], require_match=False))
    card = card_of(run_dir)
    assert [c["config_name"] for c in card.data.configs] == ["parquet"]
    assert "Not configs, because `datasets` reads one file type per dataset: openai_chat, csv" in card.text
    loaded = load(run_dir / "export", tmp_path)
    assert loaded["train"][0] == metrics["exported"] == 7


def table_rows(text: str, first_header: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"| {first_header} | examples |") + 2
    return [line for line in lines[start:] if line.startswith("|")][: len(SPLITS)]


# -- the card --------------------------------------------------------------------------------------------


def test_card_header_passes_huggingface_hub_loaders(folder: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = folder
    card = card_of(run_dir)
    data = card.data
    assert isinstance(data, DatasetCardData)
    assert DatasetCardData(**data.to_dict()).to_dict() == data.to_dict(), "the header round-trips"
    assert (data.license, data.language, data.pretty_name) == ("unknown", ["en"], "default")
    assert data.task_categories == ["text-generation", "question-answering"]
    assert data.size_categories == ["n<1K"]
    assert data.tags[:3] == ["distillation", "synthetic", "distillery"]
    for config in data.configs:
        assert [f["split"] for f in config["data_files"]] == list(SPLITS)
        for f in config["data_files"]:
            assert (run_dir / "export" / f["path"]).is_file(), f
    assert data.configs[0].get("default") is True and sum(bool(c.get("default")) for c in data.configs) == 1
    assert [i["config_name"] for i in data.dataset_info] == [c["config_name"] for c in data.configs]
    assert "## License\n\nUnknown: nobody has said yet." in card.text
    assert card.text.lstrip().startswith("# Dataset card: default")
    assert sorted(p.name for p in (run_dir / "export").iterdir() if p.is_file()) == ["README.md"]


def test_card_license_language_name_and_teacher_tags(tmp_path: Path) -> None:
    cfg = Config(export=ExportConfig())
    cfg.export.card.license, cfg.export.card.language, cfg.export.card.pretty_name = "cc-by-4.0", ["de"], "Mathe"
    cfg.model.name, cfg.model.fallbacks = "openai/gpt-4o-mini", ["anthropic_claude_haiku"]
    run_dir, _ = exported(tmp_path, cfg.export, model=cfg.model)
    data = card_of(run_dir).data
    assert (data.license, data.language, data.pretty_name) == ("cc-by-4.0", ["de"], "Mathe")
    assert data.tags == ["distillation", "synthetic", "distillery", "openai/gpt-4o-mini", "anthropic_claude_haiku"]
    assert "`cc-by-4.0` (`export.card.license`)." in card_of(run_dir).text


def test_rerun_command_in_the_card_has_no_absolute_paths() -> None:
    command = (
        "python run.py +experiment=math paths.output_dir=/tmp/x/outputs ingest.path=/home/me/proj/data/q.csv "
        "'ingest.path=[/srv/a.csv,/srv/b.csv]' +paths.cache_dir=/c model=fake"
    )
    assert portable_command(command, "/home/me/proj") == (
        "python run.py +experiment=math ingest.path=data/q.csv 'ingest.path=[.../a.csv,.../b.csv]' model=fake"
    )


def test_the_hub_id_in_the_card_is_what_the_export_renders_once_recorded(tmp_path: Path) -> None:
    run_dir, _ = exported(tmp_path, ExportConfig(formats=["openai_chat", "alpaca"]))
    before = (run_dir / "export" / "README.md").read_text()
    assert hub_line(None) in before and read_repo_id(run_dir) is None
    write_repo_id(run_dir, "acme/math-distilled")
    con = duckdb.connect()
    hub, digest = open_hub_view(con, run_dir)
    config = Config(export=ExportConfig(formats=["openai_chat", "alpaca"]))
    config.paths.root_dir = str(ROOT)
    run_stage(export.STAGE, run_dir, config, con=con, extra_inputs={"hub": hub}, texts={"rerun": "python run.py x"})
    after = (run_dir / "export" / "README.md").read_text()
    assert after == with_hub_id(before, "acme/math-distilled") != before
    assert "https://huggingface.co/datasets/acme/math-distilled" in after
    assert with_hub_id(with_hub_id(before, "other/name"), "acme/math-distilled") == after, "republishing elsewhere"
    assert digest != open_hub_view(duckdb.connect(), tmp_path)[1], "the record is part of the export's inputs"


# -- publish ---------------------------------------------------------------------------------------------


class FakeHub(BaseHTTPRequestHandler):
    """Stands in for the Hub at HF_ENDPOINT: a dataset repository behind the calls publish makes (create, check
    the card's YAML, list files, preupload, commit), refusing any token but TOKEN with 401. `files` is the
    repository, `log` every request (method, path, authorization)."""

    files: dict[str, bytes]
    log: list[tuple[str, str, str]]
    cards: list[str]
    created: dict[str, Any]

    def _reply(self, payload: Any, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _refused(self, method: str) -> bool:
        self.log.append((method, self.path, self.headers.get("Authorization", "")))
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return False
        self._reply({"error": "Invalid credentials in Authorization header"}, 401)
        return True

    def do_GET(self) -> None:
        if self._refused("GET"):
            return None
        if "/tree/" in self.path:
            return self._reply(
                [{"type": "file", "path": p, "oid": "0" * 40, "size": len(b)} for p, b in self.files.items()]
            )
        return self._reply({"error": "not here"}, 404)

    def do_POST(self) -> None:
        body = self._read()
        if self._refused("POST"):
            return None
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self.created.update(request)
            host = self.headers["Host"]
            return self._reply({"url": f"http://{host}/datasets/{request['organization']}/{request['name']}"})
        if self.path == "/api/validate-yaml":  # the Hub checks a README's metadata before the commit
            self.cards.append(json.loads(body)["content"])
            return self._reply({})
        if "/preupload/" in self.path:
            paths = [f["path"] for f in json.loads(body)["files"]]
            return self._reply({"files": [{"path": p, "uploadMode": "regular", "shouldIgnore": False} for p in paths]})
        if "/commit/" in self.path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    del self.files[item["value"]["path"]]
            repo = self.path.split("/api/datasets/", 1)[1].split("/commit/", 1)[0]
            url = f"http://{self.headers['Host']}/datasets/{repo}/commit/{'1' * 40}"
            return self._reply({"commitUrl": url, "commitOid": "1" * 40, "pullRequestUrl": None})
        return self._reply({"error": "not here"}, 404)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def hub() -> Iterator[tuple[str, type[FakeHub]]]:
    handler = type(
        "Hub",
        (FakeHub,),
        {"files": {".gitattributes": b"*.parquet filter=lfs\n"}, "log": [], "cards": [], "created": {}},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_publish_uploads_the_folder_with_the_hub_id_and_records_it(
    tmp_path: Path, hub: tuple[str, type[FakeHub]]
) -> None:
    cfg = ExportConfig(formats=["openai_chat", "parquet"], split=SplitConfig(train=0.5, test=0.5))
    run_dir, _ = exported(tmp_path, cfg, tables=many_questions())
    endpoint, repo = hub
    repo.files["stale/old.jsonl"] = b"{}\n"  # left by an earlier publish of another layout
    before = (run_dir / "export" / "README.md").read_text()
    done = publish(run_dir, endpoint, "--private", HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"published 5 files to {endpoint}/datasets/acme/math-distilled"
    assert TOKEN not in done.stdout + done.stderr
    repo_calls = [call for call in repo.log if "/api/agent-harnesses" not in call[1]]  # huggingface_hub's own, no token
    assert {auth for _, _, auth in repo_calls} == {f"Bearer {TOKEN}"}, "the token from HF_TOKEN, on every call"
    card = with_hub_id(before, "acme/math-distilled")
    local = {name: (run_dir / "export" / name).read_bytes() for name in files_under(run_dir / "export")}
    assert local["README.md"] == card.encode(), "the local card is the one uploaded"
    assert repo.files == {".gitattributes": b"*.parquet filter=lfs\n", **local}, "stale files removed, ours kept"
    private = repo.created.get("visibility") == "private" or repo.created.get("private") is True  # 2.x or 0.x/1.x
    assert private and repo.created["type"] == "dataset" and repo.created["name"] == "math-distilled"
    assert repo.cards == [card] and read_repo_id(run_dir) == "acme/math-distilled"


def publish(run_dir: Path, endpoint: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    home = str(run_dir.parent / "hf_home")  # huggingface_hub caches what it fetched for itself here
    environment = {k: v for k, v in run_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_HOME=home).items()}
    environment.pop("HF_TOKEN", None)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.publish", str(run_dir), "--repo-id", "acme/math-distilled", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in files_under(run_dir)}


def test_publish_dry_run_lists_exactly_the_export_files(
    folder: tuple[Path, dict[str, Any]], hub: tuple[str, type[FakeHub]]
) -> None:
    run_dir, _ = folder
    before = snapshot(run_dir)
    done = publish(run_dir, hub[0], "--dry-run", "--private")
    assert done.returncode == 0, done.stderr
    listed = [line.split() for line in done.stdout.splitlines()[:-1]]
    export_dir = run_dir / "export"
    names = files_under(export_dir)
    assert [name for _, name in listed] == names and len(names) == 6 * 3 + 1
    card = with_hub_id((export_dir / "README.md").read_text(), "acme/math-distilled")
    sizes = {n: (export_dir / n).stat().st_size for n in names} | {"README.md": len(card.encode())}
    assert {name: int(size) for size, name in listed} == sizes
    assert done.stdout.splitlines()[-1] == (
        f"would upload {len(names)} files, {sum(sizes.values())} bytes, to "
        "https://huggingface.co/datasets/acme/math-distilled (private)"
    )
    assert hub[1].log == [] and snapshot(run_dir) == before, "no network call, nothing written"


def test_publish_without_token_is_one_line_before_any_network_call(
    folder: tuple[Path, dict[str, Any]], hub: tuple[str, type[FakeHub]]
) -> None:
    run_dir, _ = folder
    before = snapshot(run_dir)
    done = publish(run_dir, hub[0])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: HF_TOKEN is not set: export HF_TOKEN=hf_... (a token with write access) and publish again"
    ]
    assert hub[1].log == [] and snapshot(run_dir) == before
    # the same command with a token does reach the stand-in Hub: the counter above could have seen a call
    refused = publish(run_dir, hub[0], HF_TOKEN="hf_not_a_real_token")
    assert refused.returncode == 2 and hub[1].log != []
    assert len(refused.stderr.strip().splitlines()) == 1 and "the Hub refused HF_TOKEN (401)" in refused.stderr
    assert "hf_not_a_real_token" not in refused.stdout + refused.stderr
    assert snapshot(run_dir) == before and not (run_dir / HUB_RECORD).exists(), "a failed publish records nothing"


def test_publish_mistakes_are_one_line_exit_2(
    folder: tuple[Path, dict[str, Any]], hub: tuple[str, type[FakeHub]], tmp_path: Path
) -> None:
    run_dir, _ = folder
    no_package = tmp_path / "shadow" / "huggingface_hub"
    no_package.mkdir(parents=True)
    (no_package / "__init__.py").write_text("raise ImportError('huggingface_hub is not installed here')\n")
    cases = [
        (publish(tmp_path / "nothing", hub[0], HF_TOKEN="hf_x"), "does not exist: run the pipeline into"),
        (publish(run_dir, hub[0], HF_TOKEN="hf_x", HF_HUB_OFFLINE="1"), "HF_HUB_OFFLINE is set"),
        (
            publish(run_dir, hub[0], HF_TOKEN="hf_x", PYTHONPATH=f"{no_package.parent}:{ROOT}"),
            "huggingface_hub is not installed: pip install -e '.[hub]'",
        ),
    ]
    for done, message in cases:
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert hub[1].log == []


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_e2e_folder_loads_and_a_recorded_hub_id_reaches_the_card_on_rerun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ("+experiment=math", "ingest.limit=10", "export.formats=[openai_chat,alpaca]", "export.split.train=0.7",
            "export.split.test=0.3")  # fmt: skip
    first = check_ok(run_pipeline(run_dir, *args))
    record = first.manifest["stages"]["export"]
    splits, fingerprint = record["metrics"]["splits"], record["fingerprint"]
    loaded = load(run_dir / "export", tmp_path)
    assert {s: v[0] for s, v in loaded.items()} == splits == {"train": 7, "test": 2}  # 9 of 10 match
    before = (run_dir / "export" / "README.md").read_text()

    write_repo_id(run_dir, "acme/math-distilled")  # what a successful publish leaves behind
    second = check_ok(run_pipeline(run_dir, *args))
    assert second.manifest["stages"]["export"]["fingerprint"] != fingerprint, "the recorded id is an input"
    fingerprint = second.manifest["stages"]["export"]["fingerprint"]
    assert (run_dir / "export" / "README.md").read_text() == with_hub_id(before, "acme/math-distilled")
    third = check_ok(run_pipeline(run_dir, *args))
    assert third.manifest["stages"]["export"]["fingerprint"] == fingerprint, "and nothing changes after that"
