"""Typed schemas for every config group.

Plain dataclasses with no Hydra import, so stages can take them as arguments without depending on Hydra.
`pipeline.config_store` registers them in Hydra's ConfigStore; composing a YAML key or a command-line
override that is not declared here then fails with Hydra's message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MISSING = "???"  # OmegaConf's marker for a value that must be set; spelled out to keep Hydra out of stages

# `repair` is opt-in: conf/config.yaml lists the default stages; add repair to pipeline.stages to re-ask invalid
# answers between generate and validate.
STAGE_ORDER = ("ingest", "generate", "repair", "validate", "export")


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    force: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class CsvOptions:
    """CSV/TSV dialect, spelled out so DuckDB never guesses it differently on a file's first rows."""

    delimiter: str | None = None  # None: "," for csv, a tab for tsv
    header: bool = True
    quote: str = '"'
    escape: str = '"'


@dataclass
class JsonOptions:
    records_key: str | None = None  # dotted path to the records inside one JSON object; None: the file is an array


@dataclass
class XmlOptions:
    record: str = "record"  # tag of the element that is one row (namespace-free local name)
    fields: dict[str, str] = field(default_factory=dict)  # column -> path inside the record ("@attr", "a/b")


@dataclass
class SqlOptions:
    url: str | None = None  # SQLAlchemy URL without a password (format=sql)
    query: str | None = None
    user_env: str | None = None
    password_env: str | None = None
    batch_rows: int = 10_000


@dataclass
class DocumentsOptions:
    unit: str = "chars"  # chars | tokens
    chunk_size: int = 2000
    chunk_overlap: int = 200
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md"])


@dataclass
class IngestConfig:
    format: str = "jsonl"
    path: Any = MISSING  # a file, a glob, or a list of them (None for format=sql)
    encoding: str = "utf-8"
    csv: CsvOptions = field(default_factory=CsvOptions)
    json: JsonOptions = field(default_factory=JsonOptions)
    xml: XmlOptions = field(default_factory=XmlOptions)
    sql: SqlOptions = field(default_factory=SqlOptions)
    documents: DocumentsOptions = field(default_factory=DocumentsOptions)
    columns: dict[str, str] = field(default_factory=dict)
    answer_schema_file: str | None = None
    where: str | None = None
    categories: list[str] | None = None
    limit: int | None = None
    sample: int | None = None
    dedupe: str = "json_id"  # json_id | question | none
    on_duplicate: str = "error"  # error | keep_first


@dataclass
class LimitsConfig:
    concurrency: int = 8
    requests_per_minute: float | None = None
    input_tokens_per_minute: float | None = None
    output_tokens_per_minute: float | None = None
    burst_seconds: float = 2.0
    reserve_max_tokens: bool = False
    limit_group: str | None = None


@dataclass
class PricesConfig:
    input_per_mtok: float | None = None
    output_per_mtok: float | None = None


@dataclass
class FakeServeConfig:
    latency_ms: float = 20.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0
    rate_429: float = 0.0
    seed: int = 0


@dataclass
class LocalServeConfig:
    n_ctx: int = 2048
    n_threads: int | None = None
    n_batch: int = 512
    startup_timeout_s: float = 60.0


@dataclass
class ModelConfig:
    preset: str = "${hydra:runtime.choices.model}"
    name: str = MISSING
    api_base: str | None = None
    api_key_env: str | None = None
    serve: str | None = None
    identity: str | None = None
    response_format: str = "json_schema"
    max_tokens: int | None = None
    timeout_s: float = 60.0
    transport: str = "litellm"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    prices: PricesConfig = field(default_factory=PricesConfig)
    fallbacks: list[str] = field(default_factory=list)
    fake: FakeServeConfig = field(default_factory=FakeServeConfig)
    local: LocalServeConfig = field(default_factory=LocalServeConfig)
    question_limit: int | None = None


@dataclass
class FewShotExample:
    user: str = MISSING
    assistant: str = MISSING


@dataclass
class PromptConfig:
    system: str = ""
    template: str = "{{ question }}"
    few_shot: list[FewShotExample] = field(default_factory=list)
    schema_in_system: bool = True


@dataclass
class GenerateConfig:
    samples: int = 1
    temperature: float = 0.0
    max_tokens: int | None = 512
    use_schema: bool = True
    max_attempts: int = 4
    max_rate_limit_wait_s: float = 600.0
    endpoint_down_after_s: float = 60.0
    fail_fast_after: int = 20
    fail_on_finish_reasons: list[str] = field(default_factory=lambda: ["length", "content_filter"])
    fail_on_empty: bool = True
    cache: str = "on"
    max_cost_usd: float | None = None
    dry_run: bool = False
    workers: int = 1


@dataclass
class ValidateConfig:
    scorer: Any = "numeric"  # exact | normalized_text | numeric | json_field | none | {_target_: module.function, ...}
    answer_field: str = "answer"  # dotted path in the parsed answer that is scored ("" = the whole answer)
    tolerance: float = 1e-6


@dataclass
class RepairConfig:
    max_rounds: int = 3
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5])
    feedback: str = (
        "Your previous answer is not valid:\n"
        "{% for e in errors %}- {{ e.path or '$' }}: {{ e.message }}\n{% endfor %}"
        "Reply again with the corrected answer only."
    )


@dataclass
class SplitConfig:
    train: float = 1.0
    validation: float = 0.0
    test: float = 0.0
    stratify: bool = False


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["openai_chat"])
    require_valid: bool = True
    require_match: bool = False
    is_correct: str = "not_false"  # any | not_false | true
    best_per_question: bool = False
    dedupe: str = "none"  # none | answer | question
    include_system: bool = True
    student_template: str | None = None
    assistant_template: str | None = None
    reasoning: str = "keep"  # keep | drop | think
    reasoning_field: str = "reasoning"
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def as_plain(obj: Any) -> Any:
    """Dataclass tree → JSON-able dicts, for fingerprints and the manifest."""
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj
