"""Repair: invalid answers are re-asked with their schema errors appended to the conversation, every round a
recorded, cached call with `round` and `parent_response_id`; end to end against a scripted fake server."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import RunResult, run_pipeline
from test_validate import questions_table

from pipeline.config import Config, GenerateConfig, PromptConfig, RepairConfig
from pipeline.errors import UserError
from pipeline.llm.fake_server import FakeServer
from pipeline.stage_api import StageContext
from stages import repair
from stages.generate import spec_builder

SCHEMA = json.dumps({"type": "object", "properties": {"answer": {"type": "number"}}, "required": ["answer"]})
WITH_REPAIR = "pipeline.stages=[ingest,generate,repair,validate,export]"
NOT_JSON = {"content": "not json"}
EXPORT_ALL = "export.require_match=false"  # every valid answer, right or wrong


def test_feedback_lists_every_error_with_its_path() -> None:
    template = repair._check_config(RepairConfig())
    text = template.render(
        errors=[{"path": "$", "message": "'answer' is a required property"}, {"path": "$.x", "message": "bad"}],
        round=1,
        answer="{}",
    )
    assert text == (
        "Your previous answer is not valid:\n- $: 'answer' is a required property\n- $.x: bad\n"
        "Reply again with the corrected answer only."
    )


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (RepairConfig(feedback="{% for e in errors %}"), "repair.feedback"),
        (RepairConfig(feedback="{{ nope }}"), "repair.feedback"),
    ],
)
def test_bad_repair_config(cfg: RepairConfig, key: str) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        repair._check_config(cfg)


def test_temperature_schedule() -> None:
    cfg = RepairConfig(temperatures=[0.0, 0.25, 0.5])
    assert [repair.temperature(cfg, k) for k in (1, 2, 3, 4)] == [0.0, 0.25, 0.5, 0.5]


def test_request_is_the_first_one_plus_each_answer_and_its_errors(tmp_path: Path) -> None:
    con = duckdb.connect()
    table = questions_table([{"question_id": "q1", "question": "What is 2+2?", "answer_schema": SCHEMA}])
    cfg = Config(
        prompt=PromptConfig(system="Be exact.", template="Q: {{ question }}"),
        generate=GenerateConfig(temperature=0.7, max_tokens=99),
        repair=RepairConfig(temperatures=[0.0, 0.25]),
    )
    ctx = StageContext(
        cfg=cfg, con=con, inputs={"questions": con.from_arrow(table)}, writer=None, log=logging.getLogger()
    )  # type: ignore[arg-type]
    build = repair.RepairBuilder(spec_builder(ctx), cfg.repair)
    row = {
        **table.to_pylist()[0],
        "sample_index": 0,
        "round": 2,
        "history": [
            {"content": "four", "feedback": "errors 1"},
            {"content": '{"answer": "4"}', "feedback": "errors 2"},
        ],
    }
    spec = build(row)
    assert [m["role"] for m in spec.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert spec.messages[0]["content"].startswith("Be exact.") and "JSON Schema" in spec.messages[0]["content"]
    assert [m["content"] for m in spec.messages[1:]] == [
        "Q: What is 2+2?",
        "four",
        "errors 1",
        '{"answer": "4"}',
        "errors 2",
    ]
    assert (spec.temperature, spec.max_tokens, spec.response_schema) == (0.25, 99, SCHEMA)
    assert pickle.loads(pickle.dumps(build))(row) == spec  # worker processes get the builder pickled


# -- end to end ------------------------------------------------------------------------------------------


def run_math(run_dir: Path, server: FakeServer, *overrides: str) -> RunResult:
    result = run_pipeline(
        run_dir, "+experiment=math", "model.serve=null", f"model.api_base={server.api_base}", *overrides
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    return result


def table(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return list(pq.read_table(run_dir / "tables" / f"{name}.parquet").to_pylist())


@pytest.fixture(scope="module")
def repaired(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three questions whose first answers are not JSON; one repair is invalid again and needs a second round."""
    base = tmp_path_factory.mktemp("repair")
    with FakeServer() as server:
        server.configure(script=[NOT_JSON, NOT_JSON, NOT_JSON, {"content": '{"answer": "x"}'}])
        # the repaired answers are valid but wrong: export them anyway (export.require_match=false), to check them
        first = run_math(base / "run", server, "ingest.limit=3", WITH_REPAIR, EXPORT_ALL)
        first_manifest = first.manifest  # read now: the reruns below rewrite the file
        requests_first = server.stats()["requests"]
        again = run_math(base / "run", server, "ingest.limit=3", WITH_REPAIR, EXPORT_ALL)
        forced = run_math(base / "run", server, "ingest.limit=3", WITH_REPAIR, EXPORT_ALL, "pipeline.force=[repair]")
        requests_after_reruns = server.stats()["requests"]
    with FakeServer() as fresh:  # no script: only the shared cache can give the same invalid answers back
        elsewhere = run_math(base / "other", fresh, "ingest.limit=3", WITH_REPAIR, EXPORT_ALL)
        requests_elsewhere = fresh.stats()["requests"]
    return {
        "first": first,
        "first_manifest": first_manifest,
        "again": again,
        "forced": forced,
        "elsewhere": elsewhere,
        "requests": (requests_first, requests_after_reruns, requests_elsewhere),
    }


@pytest.mark.slow
def test_repair_rounds_are_recorded_calls(repaired: dict[str, Any]) -> None:
    run_dir = repaired["first"].run_dir
    repairs = table(run_dir, "repairs")
    responses = {r["response_id"]: r for r in table(run_dir, "responses")}
    assert sorted(r["round"] for r in repairs) == [1, 1, 1, 2]
    by_id = {r["response_id"]: r for r in repairs}
    for row in repairs:
        parent = by_id.get(row["parent_response_id"]) or responses[row["parent_response_id"]]
        assert parent["round"] == row["round"] - 1
        assert row["root_response_id"] in responses
        assert row["temperature"] == {1: 0.0, 2: 0.25}[row["round"]]
        assert row["status"] == "ok" and row["request_hash"]
    assert {a["response_id"] for a in table(run_dir, "repair_attempts")} == set(by_id)
    metrics = repaired["first_manifest"]["stages"]["repair"]["metrics"]
    assert (metrics["invalid_first_pass"], metrics["repaired"], metrics["still_invalid"]) == (3, 3, 0)
    assert [(r["round"], r["asked"], r["still_invalid"]) for r in metrics["rounds"]] == [(1, 3, 1), (2, 1, 0)]
    assert repaired["requests"][0] == 3 + 4
    assert repaired["first_manifest"]["totals"]["calls"] == 3 + 4


@pytest.mark.slow
def test_validate_reports_first_pass_and_after_repair(repaired: dict[str, Any]) -> None:
    run_dir = repaired["first"].run_dir
    metrics = repaired["first_manifest"]["stages"]["validate"]["metrics"]
    assert (metrics["valid_pct_first_pass"], metrics["valid_pct"], metrics["validations"]) == (0.0, 100.0, 7)
    finals = [v for v in table(run_dir, "validations") if v["is_final"]]
    assert len(finals) == 3 and all(v["is_valid"] and v["round"] >= 1 for v in finals)
    lines = (run_dir / "export" / "openai_chat" / "train.jsonl").read_text().splitlines()
    answers = {json.loads(line)["messages"][-1]["content"] for line in lines}
    repaired_contents = {
        r["content"] for r in table(run_dir, "repairs") if r["response_id"] in {v["response_id"] for v in finals}
    }
    assert len(lines) == 3 and answers == repaired_contents
    card = (run_dir / "export" / "README.md").read_text()
    assert "| valid at first pass | 0 of 3 (0.0%) |" in card
    assert "| valid after repair | 3 of 3 (100.0%) |" in card


@pytest.mark.slow
def test_rerun_makes_no_new_calls(repaired: dict[str, Any]) -> None:
    first, after_reruns, _ = repaired["requests"]
    assert after_reruns == first, "a rerun of the folder and a forced repair come from the journal"
    assert repaired["again"].manifest["stages"]["repair"]["status"] == "done"
    forced = repaired["forced"].manifest["stages"]["repair"]["metrics"]
    assert (forced["calls"], forced["reused_journal"]) == (0, 4)
    assert table(repaired["forced"].run_dir, "repairs") == table(repaired["first"].run_dir, "repairs")


@pytest.mark.slow
def test_repairs_come_from_the_shared_cache(repaired: dict[str, Any]) -> None:
    assert repaired["requests"][2] == 0, "the whole chain, first answers and repairs, comes from the cache"
    ids = lambda run: sorted(r["response_id"] for r in table(run.run_dir, "repairs"))  # noqa: E731
    assert ids(repaired["elsewhere"]) == ids(repaired["first"])
    assert repaired["elsewhere"].manifest["stages"]["repair"]["metrics"]["cache_hits"] == 4


@pytest.mark.slow
def test_repair_gives_up_after_max_rounds_and_export_warns(tmp_path: Path, fake_server: FakeServer) -> None:
    fake_server.configure(script=[NOT_JSON] * 4)
    result = run_math(tmp_path / "run", fake_server, "ingest.limit=1", WITH_REPAIR, "repair.max_rounds=2")
    manifest = result.manifest
    metrics = manifest["stages"]["repair"]["metrics"]
    assert (metrics["repairs"], metrics["repaired"], metrics["still_invalid"]) == (2, 0, 1)
    assert [r["temperature"] for r in metrics["rounds"]] == [0.0, 0.25]
    assert fake_server.stats()["requests"] == 3
    assert manifest["stages"]["validate"]["metrics"]["valid"] == 0
    assert manifest["stages"]["export"]["metrics"]["exported"] == 0
    output = result.stdout + result.stderr
    assert "export selected 0 answers" in output and "valid (export.require_valid): 0" in output
    assert (tmp_path / "run" / "export" / "openai_chat" / "train.jsonl").read_text() == ""
    assert "| valid (export.require_valid) | 0 |" in (tmp_path / "run" / "export" / "README.md").read_text()
