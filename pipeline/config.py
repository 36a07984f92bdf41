"""Typed schemas for every config group.

Plain dataclasses with no Hydra import, so stages can take them as arguments without depending on Hydra.
`pipeline.config_store` registers them in Hydra's ConfigStore, and `pipeline.config_check` refuses any key
not declared here (with or without `+`) and any value outside a fixed set before a stage runs. A key with
a fixed set of values is a `StrEnum` (equal to its plain string, so stage code may compare with text); one
whose YAML spelling cannot be an Enum name (`export.is_correct=true` is a bool to Hydra) lists its values
in the field's `choices` metadata instead. `dict` fields (`ingest.columns`, `ingest.xml.fields`) stay open.
A number's range is field metadata too: `{"min": 1}`, `{"max": 2}` (inclusive), `{"above": 0}` (exclusive);
on a list, the bounds hold for each item and `{"min_items": 1}` refuses an empty one. None passes wherever
the field is Optional (it means "no limit" or "all").

The defaults here are the one place a key's default is written: a preset (`conf/model/<name>.yaml`, the
`model` group) and an ingest config (`conf/ingest/<format>.yaml`) state only what differs from them, so the
comment on each field below is its documentation. `python run.py model=NAME --cfg job` prints a preset whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

MISSING = "???"  # OmegaConf's marker for a value that must be set; spelled out to keep Hydra out of stages

# `repair` and `judge` are opt-in: conf/config.yaml lists the default stages; add repair to pipeline.stages to
# re-ask invalid answers between generate and validate, judge to have an LLM judge the final answers after validate.
STAGE_ORDER = ("ingest", "generate", "repair", "validate", "judge", "export")


def choices(*values: str) -> dict[str, tuple[str, ...]]:
    """Field metadata for a text key with a fixed set of values that cannot be an Enum (see the docstring)."""
    return {"choices": values}


def choices_of(schema: type, name: str) -> tuple[str, ...]:
    """The values a `choices` field takes, for the code that reads it (written once, in its metadata)."""
    return next(tuple(f.metadata["choices"]) for f in fields(schema) if f.name == name)


class StageName(StrEnum):
    ingest = "ingest"
    generate = "generate"
    repair = "repair"
    validate = "validate"
    judge = "judge"
    export = "export"


class InputFormat(StrEnum):
    csv = "csv"
    tsv = "tsv"
    json = "json"
    jsonl = "jsonl"
    parquet = "parquet"
    xml = "xml"
    sqlite = "sqlite"
    sql = "sql"
    documents = "documents"


class IngestDedupe(StrEnum):
    json_id = "json_id"
    question = "question"
    none = "none"


class OnDuplicate(StrEnum):
    error = "error"
    keep_first = "keep_first"


class ChunkUnit(StrEnum):
    chars = "chars"
    tokens = "tokens"


class Served(StrEnum):
    fake = "fake"
    llama_cpp = "llama_cpp"


class ResponseFormat(StrEnum):
    json_schema = "json_schema"
    json_object_schema = "json_object_schema"
    json_object = "json_object"
    none = "none"


class Transport(StrEnum):
    litellm = "litellm"
    direct = "direct"


class BatchApi(StrEnum):
    """Which provider batch API a preset's endpoint offers (`generate.mode=batch`); none: online only."""

    none = "none"
    openai = "openai"  # OpenAI's /v1/files + /v1/batches (also Azure and OpenAI-compatible servers)
    anthropic = "anthropic"  # Anthropic's /v1/messages/batches


class GenerateMode(StrEnum):
    online = "online"
    batch = "batch"


class ExecutorKind(StrEnum):
    local = "local"
    ray = "ray"


class CacheMode(StrEnum):
    on = "on"
    read_only = "read_only"
    off = "off"


class ExportFormat(StrEnum):
    openai_chat = "openai_chat"
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    csv = "csv"
    json = "json"
    parquet = "parquet"


class ExportDedupe(StrEnum):
    none = "none"
    answer = "answer"
    question = "question"


class Reasoning(StrEnum):
    keep = "keep"
    drop = "drop"
    think = "think"


@dataclass
class PipelineConfig:
    stages: list[StageName] = field(default_factory=lambda: [StageName(s) for s in STAGE_ORDER])
    force: list[StageName] = field(default_factory=list)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class CsvOptions:
    """CSV/TSV dialect, spelled out so DuckDB never guesses it differently on a file's first rows."""

    delimiter: str | None = None  # field separator, one character; None: "," for csv, a tab for tsv
    header: bool = True  # the first line names the columns (False: they are column0, column1, ...)
    quote: str = '"'  # quote character ("" for none)
    escape: str = '"'  # escape inside quotes ('"' means a doubled quote, as Excel writes it)


@dataclass
class JsonOptions:
    records_key: str | None = None  # dotted path to the records inside one JSON object; None: the file is an array


@dataclass
class XmlOptions:
    record: str = "record"  # tag of the element that is one row (namespace-free local name)
    # column -> path inside the record: child/grandchild, @attribute, child/@attribute, . (its text)
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class SqlOptions:
    url: str | None = None  # SQLAlchemy URL without a password (format=sql; one with a password is refused)
    query: str | None = None  # any SELECT, run read-only; its result columns feed `ingest.columns`
    user_env: str | None = None  # env variable holding the user name (None: the URL's user, if any)
    password_env: str | None = None  # env variable holding the password (None: none, e.g. trust or .pgpass)
    # rows fetched at a time (a server-side cursor: the result is never held whole)
    batch_rows: int = field(default=10_000, metadata={"min": 1})


@dataclass
class DocumentsOptions:
    unit: ChunkUnit = ChunkUnit.chars  # what sizes count: chars | tokens (OpenAI's cl100k_base, bundled copy)
    # at most this many units per chunk; chunks end on a paragraph break where possible
    chunk_size: int = field(default=2000, metadata={"min": 1})
    # units each chunk repeats from the end of the one before (0: none)
    chunk_overlap: int = field(default=200, metadata={"min": 0})
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md"])  # file types taken from a folder


@dataclass
class IngestConfig:
    format: InputFormat = InputFormat.jsonl  # which reader opens `path` (the ingest group's options set it)
    path: Any = MISSING  # a file, a folder, a glob, or a list of them (None for format=sql)
    # utf-8, utf-16 and latin-1 are read directly; others (e.g. cp1252) are transcoded first; for XML, utf-8
    # lets the document's own <?xml encoding=...?> decide and anything else overrides it
    encoding: str = "utf-8"
    csv: CsvOptions = field(default_factory=CsvOptions)  # format=csv|tsv: the dialect
    json: JsonOptions = field(default_factory=JsonOptions)  # format=json: where the records are
    xml: XmlOptions = field(default_factory=XmlOptions)  # format=xml: which elements are rows, where their fields are
    sql: SqlOptions = field(default_factory=SqlOptions)  # format=sqlite|sql: the query (sql: database, credentials)
    documents: DocumentsOptions = field(default_factory=DocumentsOptions)  # format=documents: chunking
    # target column -> DuckDB SQL expression over the source's columns; open: any key becomes an extra column
    # and a template variable. `question` is required; `golden_answer`, `json_id`, `category` are known columns
    columns: dict[str, str] = field(default_factory=dict)
    optional_columns: dict[str, str] = field(default_factory=dict)  # like `columns`, only where the source has them
    answer_schema_file: str | None = None  # JSON Schema every answer must satisfy (None: none, or a per-row column)
    where: str | None = None  # SQL filter over the source columns, e.g. "length(question) < 2000" (None: every row)
    categories: list[str] | None = None  # keep only these categories, e.g. [algebra, geometry] (None: all)
    limit: int | None = field(default=None, metadata={"min": 1})  # read only the first N rows (None: all)
    # keep N rows drawn at random with the top-level seed (None: no sampling)
    sample: int | None = field(default=None, metadata={"min": 1})
    dedupe: IngestDedupe = IngestDedupe.json_id  # duplicates by: json_id (the question_id) | question (text) | none
    on_duplicate: OnDuplicate = OnDuplicate.error  # what a duplicate does: error (names the rows) | keep_first


@dataclass
class LimitsConfig:
    """What the endpoint allows (the preset's `api_base` and model id, or its `limit_group`); the engine waits
    rather than trip them, and shares them with every process on the machine that calls the same endpoint."""

    concurrency: int = field(default=8, metadata={"min": 1})  # calls in flight at once
    requests_per_minute: float | None = field(default=None, metadata={"above": 0})  # None: no request limit
    input_tokens_per_minute: float | None = field(default=None, metadata={"above": 0})  # None: no input-token limit
    # None: no output-token limit (or metered with input)
    output_tokens_per_minute: float | None = field(default=None, metadata={"above": 0})
    # how many seconds of rate the buckets may spend at once
    burst_seconds: float = field(default=2.0, metadata={"above": 0})
    reserve_max_tokens: bool = False  # count max_tokens against the output limit up front (as Anthropic does)
    limit_group: str | None = None  # share limits with other presets naming the same group


@dataclass
class PricesConfig:
    """USD per million tokens; None: looked up in litellm's bundled price map (unknown stays unknown, never 0)."""

    input_per_mtok: float | None = field(default=None, metadata={"min": 0})
    output_per_mtok: float | None = field(default=None, metadata={"min": 0})
    # generate.mode=batch (None: litellm's batch price, else half)
    batch_input_per_mtok: float | None = field(default=None, metadata={"min": 0})
    # generate.mode=batch (None: litellm's batch price, else half)
    batch_output_per_mtok: float | None = field(default=None, metadata={"min": 0})


@dataclass
class FakeServeConfig:
    """`serve: fake`: how the project's fake server behaves."""

    latency_ms: float = field(default=20.0, metadata={"min": 0})  # simulated latency per call
    latency_jitter_ms: float = field(default=0.0, metadata={"min": 0})  # +/- uniform jitter on the latency
    error_rate: float = field(default=0.0, metadata={"min": 0, "max": 1})  # share of calls answered with HTTP 500
    rate_429: float = field(default=0.0, metadata={"min": 0, "max": 1})  # share of calls answered with HTTP 429
    seed: int = 0  # makes the simulated faults reproducible


@dataclass
class LocalServeConfig:
    """`serve: llama_cpp`: how llama-cpp-python's server runs the embedded weights."""

    n_ctx: int = field(default=2048, metadata={"min": 1})  # context window in tokens: prompt + max_tokens must fit
    # CPU threads per answer (None: one less than the cores, at least 1, at most 4)
    n_threads: int | None = field(default=None, metadata={"min": 1})
    n_batch: int = field(default=512, metadata={"min": 1})  # prompt tokens processed per batch
    # how long the server may take to load the weights and answer
    startup_timeout_s: float = field(default=60.0, metadata={"above": 0})


@dataclass
class ModelConfig:
    """A preset: one `conf/model/<name>.yaml` (the `model` group): a model id, its endpoint, key variable,
    limits, prices and fallbacks. `model=NAME` picks the teacher's; `model.fallbacks` and
    `validate.judge.preset` name others.
    """

    preset: str = "${hydra:runtime.choices.model}"  # the preset's name (the file's), filled in by Hydra
    name: str = MISSING  # litellm model id, e.g. openai/gpt-4o-mini
    api_base: str | None = None  # the endpoint's URL (None: the provider's; with `serve`, the server started)
    api_key_env: str | None = None  # env variable holding the key, never the key itself (None: no key needed)
    serve: Served | None = None  # a server the run starts and stops itself: fake | llama_cpp (None: none)
    identity: str | None = None  # what the response cache keys on (None: the model id); never the URL or port
    response_format: ResponseFormat = ResponseFormat.json_schema  # how the answer schema is sent
    # the preset's cap on completion tokens per call (the lower of it and generate.max_tokens is sent; None: no
    # cap of its own)
    max_tokens: int | None = field(default=None, metadata={"min": 1})
    timeout_s: float = field(default=60.0, metadata={"above": 0})  # seconds before a call is abandoned and retried
    transport: Transport = Transport.litellm  # direct: the project's aiohttp client for OpenAI's wire format
    batch: BatchApi = BatchApi.none  # the endpoint's batch API for generate.mode=batch: openai | anthropic | none
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    prices: PricesConfig = field(default_factory=PricesConfig)
    fallbacks: list[str] = field(default_factory=list)  # other presets tried in order when a call fails for good
    fake: FakeServeConfig = field(default_factory=FakeServeConfig)
    local: LocalServeConfig = field(default_factory=LocalServeConfig)
    # ask only the first N questions (None: every one)
    question_limit: int | None = field(default=None, metadata={"min": 1})


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
class BatchConfig:
    """Provider batch mode (`generate.mode=batch`): none of these keys changes a result."""

    wait: bool = True  # poll until every batch ended; false: submit, exit 4 and collect with a later run
    poll_s: float = field(default=30.0, metadata={"above": 0})  # first wait between two polls of a batch
    poll_max_s: float = field(default=600.0, metadata={"above": 0})  # the waits grow by half each poll up to this
    # requests per batch (None: the provider's limit)
    max_requests: int | None = field(default=None, metadata={"min": 1})
    # bytes of request lines per batch (None: the provider's limit)
    max_bytes: int | None = field(default=None, metadata={"min": 1})


@dataclass
class RayGenerateConfig:
    """`generate.executor=ray`: where the cluster is and how many callers (one CPU each) send the calls."""

    address: str = "auto"  # auto: the cluster this machine belongs to; HOST:PORT; local: one started for the run
    tasks: int = field(default=2, metadata={"min": 1})  # callers on the cluster, one CPU each


@dataclass
class GenerateConfig:
    samples: int = field(default=1, metadata={"min": 1})
    temperature: float = field(default=0.0, metadata={"min": 0, "max": 2})
    max_tokens: int | None = field(default=512, metadata={"min": 1})
    use_schema: bool = True
    max_attempts: int = field(default=4, metadata={"min": 1})
    max_rate_limit_wait_s: float = field(default=600.0, metadata={"min": 0})
    endpoint_down_after_s: float = field(default=60.0, metadata={"min": 0})
    fail_fast_after: int = field(default=20, metadata={"min": 1})
    fail_on_finish_reasons: list[str] = field(default_factory=lambda: ["length", "content_filter"])
    fail_on_empty: bool = True
    cache: CacheMode = CacheMode.on
    max_cost_usd: float | None = field(default=None, metadata={"min": 0})
    dry_run: bool = False
    workers: int = field(default=1, metadata={"min": 1})
    mode: GenerateMode = GenerateMode.online  # batch: the preset's batch API (`model.batch`), at its batch price
    batch: BatchConfig = field(default_factory=BatchConfig)  # batch mode's waiting, polling and batch sizes
    executor: ExecutorKind = ExecutorKind.local  # local: this machine (generate.workers processes); ray: a Ray cluster
    ray: RayGenerateConfig = field(default_factory=RayGenerateConfig)
    # Observers (pipeline/observers.py): none of these keys changes a result, so none is in the fingerprint.
    observers: list[Any] = field(default_factory=list)  # [{_target_: module.Class, ...}]
    # None: no metrics; 0: any free port; N: port N (127.0.0.1 only)
    metrics_port: int | None = field(default=None, metadata={"min": 0, "max": 65535})
    event_log: bool = False  # every event as a JSON line in the run folder's events.jsonl
    # events waiting for the observers; beyond it they are dropped and counted
    observer_queue: int = field(default=10_000, metadata={"min": 1})


@dataclass
class JudgeConfig:
    """The LLM judge (the opt-in `judge` stage): a preset, a rubric, and a JSON verdict per final answer."""

    preset: str | None = None  # a conf/model/ preset name; None: the teacher's preset (`model`)
    system: str = (
        "You are a strict grader. Judge whether the answer correctly and completely answers the question"
        "{% if golden_answer is not none %}, using the reference answer as ground truth{% endif %}."
    )
    template: str = (
        "<question>\n{{ question }}\n</question>\n<answer>\n{{ answer }}\n</answer>\n"
        "{% if golden_answer is not none %}<golden_answer>\n{{ golden_answer }}\n</golden_answer>\n{% endif %}"
        "Give a score from 0 (wrong) to 1 (right), the verdict pass or fail, and a one-sentence rationale."
    )
    only_valid: bool = True  # judge only answers that passed their JSON Schema
    temperature: float = field(default=0.0, metadata={"min": 0, "max": 2})
    max_tokens: int | None = field(default=256, metadata={"min": 1})


@dataclass
class ValidateConfig:
    scorer: Any = field(  # or {_target_: module.function, ...}
        default="numeric", metadata=choices("exact", "normalized_text", "numeric", "json_field", "none")
    )
    answer_field: str = "answer"  # dotted path in the parsed answer that is scored ("" = the whole answer)
    tolerance: float = field(default=1e-6, metadata={"min": 0})  # numeric: absolute difference still counted as a match
    # numeric: also a match within this fraction of the golden (None: off)
    relative_tolerance: float | None = field(default=None, metadata={"min": 0})
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class RepairConfig:
    max_rounds: int = field(default=3, metadata={"min": 0})
    temperatures: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5], metadata={"min_items": 1, "min": 0, "max": 2}
    )
    feedback: str = (
        "Your previous answer is not valid:\n"
        "{% for e in errors %}- {{ e.path or '$' }}: {{ e.message }}\n{% endfor %}"
        "Reply again with the corrected answer only."
    )


@dataclass
class SplitConfig:
    train: float = field(default=1.0, metadata={"min": 0})
    validation: float = field(default=0.0, metadata={"min": 0})
    test: float = field(default=0.0, metadata={"min": 0})
    stratify: bool = False


@dataclass
class CardConfig:
    """The Hub card's header fields that the run cannot know (the data's license and language)."""

    license: str = "unknown"  # a Hub license id (apache-2.0, cc-by-4.0, ...); unknown until the user says
    language: list[str] = field(default_factory=lambda: ["en"])
    pretty_name: str | None = None  # None: the experiment's name


@dataclass
class ExportConfig:
    formats: list[ExportFormat] = field(default_factory=lambda: [ExportFormat.openai_chat], metadata={"min_items": 1})
    require_valid: bool = True
    require_match: bool | None = None  # None (auto): match the golden answer where one and a scorer apply
    is_correct: str = field(default="not_false", metadata=choices("any", "not_false", "true"))
    best_per_question: bool = False
    dedupe: ExportDedupe = ExportDedupe.none
    include_system: bool = True
    student_template: str | None = None
    assistant_template: str | None = None
    reasoning: Reasoning = Reasoning.keep
    reasoning_field: str = "reasoning"
    require_judge: bool = False  # keep only answers the judge stage passed
    split: SplitConfig = field(default_factory=SplitConfig)
    card: CardConfig = field(default_factory=CardConfig)


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
