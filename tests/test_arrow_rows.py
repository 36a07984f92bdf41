"""`pipeline.arrow_rows` builds the same Arrow data as pyarrow's `from_pylist`, without importing pandas."""

from __future__ import annotations

import math
import subprocess
import sys

import pyarrow as pa
import pytest
from conftest import ROOT

from pipeline import arrow_rows
from pipeline.tables import VALIDATIONS as SCHEMA
from stages.export_formats import TABULAR

ROWS = [
    {
        "response_id": "r1",
        "question_id": "q1",
        "category": 'ünïcode ✓ "quoted"\nnew line',
        "is_valid": False,
        "errors": [{"path": "$.answer", "message": "'x' is not of type 'number'"}, {"path": "$", "message": ""}],
        "parsed": None,
        "score": math.nan,
        "matches_golden": False,
        "sample_index": 2,
        "round": 0,
        "is_final": True,
        "not_in_the_schema": "left out",
    },
    {"response_id": "r2", "score": math.inf, "errors": [], "sample_index": -1},  # the rest missing: null
    {"response_id": "r3", "score": 0.1 + 0.2, "is_valid": True, "errors": None, "round": 2**31 - 1},
]


def _same(left: pa.Table, right: pa.Table) -> None:
    assert left.schema == right.schema
    for name in left.schema.names:
        a, b = left.column(name).to_pylist(), right.column(name).to_pylist()
        assert [x if x == x else "nan" for x in a] == [x if x == x else "nan" for x in b], name  # NaN != NaN


def test_rows_become_the_same_table_as_from_pylist() -> None:
    _same(arrow_rows.table(ROWS, SCHEMA), pa.Table.from_pylist(ROWS, schema=SCHEMA))
    batches = list(arrow_rows.batches(ROWS, SCHEMA))
    assert sum(b.num_rows for b in batches) == 3 and all(b.schema == SCHEMA for b in batches)


def test_no_rows_is_an_empty_table_of_the_schema() -> None:
    assert arrow_rows.table([], TABULAR).schema == TABULAR and arrow_rows.table([], TABULAR).num_rows == 0
    assert list(arrow_rows.batches([], SCHEMA)) == []


def test_many_rows_stay_one_chunk_in_order() -> None:
    rows = [{"response_id": f"r{i}", "question_id": "q" * 500, "sample_index": i} for i in range(5000)]  # > 1 MB
    table = arrow_rows.table(rows, SCHEMA)
    assert table.column("sample_index").num_chunks == 1
    assert table.column("sample_index").to_pylist() == list(range(5000))


@pytest.mark.parametrize("value", [b"bytes", {1, 2}, object()])
def test_a_value_json_cannot_hold_is_refused(value: object) -> None:
    with pytest.raises(TypeError, match="not a JSON value"):
        arrow_rows.table([{"parsed": value}], SCHEMA)


def test_a_value_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(pa.ArrowInvalid):
        arrow_rows.table([{"sample_index": "three"}], SCHEMA)


def test_building_tables_does_not_import_pandas() -> None:
    code = (
        "import sys\n"
        "from pipeline import arrow_rows\n"
        "from pipeline.tables import VALIDATIONS as SCHEMA\n"
        "arrow_rows.table([{'response_id': 'r', 'errors': [{'path': '$', 'message': 'm'}]}], SCHEMA)\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
