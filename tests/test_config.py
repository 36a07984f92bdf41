"""Config tests: every experiment and group option composes into the typed schema, every YAML key is
documented, typos fail as usage errors (exit 2) naming the key, and `--help` / `--cfg` stay fast."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import config_store
from pipeline.config import Config, PathsConfig

CONF = ROOT / "conf"
GROUPS = ("model", "prompt", "ingest", "generate", "validate", "export", "paths")
EXPERIMENTS = sorted(CONF.glob("experiment/*.yaml"))
GROUP_OPTIONS = sorted((group, path.stem) for group in GROUPS for path in (CONF / group).glob("*.yaml"))
YAML_FILES = sorted(CONF.rglob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    """Hydra's compose API on the repo's conf/ with the typed schema registered, once per module."""
    config_store.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def compose_typed(overrides: list[str]) -> Config:
    """Compose like `python run.py <overrides>` and resolve into the dataclass tree the runner uses."""
    cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` interpolations resolve against it
    with open_dict(cfg):
        del cfg["hydra"]
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


# -- composing ------------------------------------------------------------------------------------------


def test_found_configs() -> None:
    assert EXPERIMENTS, "no conf/experiment/*.yaml"
    for group in GROUPS:
        assert any(g == group for g, _ in GROUP_OPTIONS), f"conf/{group}/ has no options"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_composes_to_typed_config(hydra_conf: None, path: Path) -> None:
    cfg = compose_typed([f"+experiment={path.stem}"])
    assert cfg.name == path.stem, "an experiment sets `name` to its own file name (run folders go by it)"
    assert cfg.model.preset == "local"  # the embedded model is the default teacher
    assert Path(cfg.paths.root_dir).is_absolute()
    assert cfg.paths.data_dir == f"{cfg.paths.root_dir}/data"
    assert set(cfg.pipeline.stages) <= {"ingest", "generate", "validate", "export"}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_option_composes(hydra_conf: None, group: str, option: str) -> None:
    cfg = compose_typed([f"{group}={option}"])
    if group == "model":
        assert cfg.model.preset == option
        assert cfg.model.name
    section = getattr(cfg, group)
    assert section is not None


def test_math_experiment_values(hydra_conf: None) -> None:
    cfg = compose_typed(["+experiment=math"])
    assert cfg.ingest.answer_schema_file == f"{cfg.paths.data_dir}/math/answer_schema.json"
    assert Path(cfg.ingest.answer_schema_file).is_file()
    assert Path(cfg.ingest.path).is_file()
    assert cfg.validate.scorer == "numeric"
    assert cfg.validate.tolerance == pytest.approx(0.01)
    assert cfg.validate.relative_tolerance is None, "absolute only: 101 must not match 100"
    assert cfg.prompt.system, "the math experiment uses the math prompt, which has a system prompt"


def test_unknown_override_fails_to_compose(hydra_conf: None) -> None:
    with pytest.raises(Exception, match="tempreture"):
        compose(config_name="config", overrides=["model.tempreture=1"])


# -- conventions of the YAML files ----------------------------------------------------------------------


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_header(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# @package _global_", f"{path}: the first line must be `# @package _global_`"
    comments = [line for line in lines[1:] if line.lstrip().startswith("#")]
    assert comments, f"{path}: no comment after the package line"
    expected = re.compile(rf"# python run\.py (-m )?\+experiment={re.escape(path.stem)}( |$)")
    assert expected.match(comments[0]), f"{path}: first comment must be the command `{expected.pattern}`"


KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_./@-]+|\"[^\"]*\"|'[^']*')\s*:(?:\s|$)")
QUOTED = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^']|'')*'")
BLOCK_SCALAR = re.compile(r":\s*[|>][-+0-9]*\s*(?:#.*)?$")


def _has_inline_comment(line: str) -> bool:
    unquoted = QUOTED.sub('""', line)
    return re.search(r"(^|\s)#", unquoted) is not None


def uncommented_keys(text: str) -> list[str]:
    """`line N: key` for each mapping key with neither a `#` comment on its line nor a comment line
    directly above it. List items and block scalars' continuation lines are exempt."""
    missing: list[str] = []
    lines = text.splitlines()
    block_indent: int | None = None  # inside a block scalar: lines indented deeper than its key
    item_indent: int | None = None  # inside a list item: lines indented at least as deep as its content
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("- ") or stripped == "-":
            item_indent = indent + 2
            continue
        if item_indent is not None:
            if indent >= item_indent:
                continue
            item_indent = None
        match = KEY.match(line)
        if match is None:
            continue  # e.g. a flow collection's continuation line
        if BLOCK_SCALAR.search(QUOTED.sub('""', line)):
            block_indent = indent
        above = lines[number - 2].strip() if number >= 2 else ""
        if not (_has_inline_comment(line) or above.startswith("#")):
            missing.append(f"line {number}: {match.group('key')}")
    return missing


def test_comment_checker_itself() -> None:
    text = "\n".join(
        [
            "# header",
            "a: 1",  # comment directly above
            "b: 2  # inline",
            "c: '# not a comment'",
            "d:",
            "  - x",
            "  - y",
            "# about e",
            "e: >-",
            "  folded text: with a colon",
            "  more: text",
            "f:",
            "  g: 1  # ok",
            "",
            "h: 3",
            "few_shot:  # examples",
            "  - user: hi",
            "    assistant: hello",
            "i: 4",
        ]
    )
    assert uncommented_keys(text) == ["line 4: c", "line 5: d", "line 12: f", "line 15: h", "line 19: i"]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_key_has_a_comment(path: Path) -> None:
    missing = uncommented_keys(path.read_text(encoding="utf-8"))
    assert not missing, f"{path.relative_to(ROOT)}: keys without a comment: {'; '.join(missing)}"


# -- the command line -----------------------------------------------------------------------------------


def run_py(*args: str, cwd: Path = ROOT, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *python_flags, str(ROOT / "run.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=60)


def assert_usage_error(done: subprocess.CompletedProcess[str], *names: str) -> None:
    assert done.returncode == 2, f"exit {done.returncode}, expected 2\n{done.stderr}"
    for name in names:
        assert name in done.stderr, f"stderr does not name {name!r}:\n{done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize("override", ["model.tempreture=1", "generate.tempreture=0.5"])
def test_typo_on_command_line_is_a_usage_error(tmp_path: Path, override: str) -> None:
    done = run_py("+experiment=math", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert_usage_error(done, "tempreture")
    assert not (tmp_path / "run").exists(), "nothing is written for a config that does not compose"


def test_typo_inside_yaml_is_a_usage_error(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    subprocess.run(["cp", "-r", str(CONF), str(conf)], check=True)
    with open(conf / "generate" / "default.yaml", "a", encoding="utf-8") as fh:
        fh.write("tempreture: 0.5  # a typo\n")
    done = run_py("--config-path", str(conf), "+experiment=math", f"hydra.run.dir={tmp_path / 'run'}")
    assert_usage_error(done, "generate.tempreture", "generate/default.yaml", "did you mean generate.temperature?")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [("--help",), ("+experiment=math", "--cfg", "job")], ids=["help", "cfg-job"])
def test_help_and_cfg_are_fast_and_skip_litellm(args: tuple[str, ...]) -> None:
    started = time.monotonic()
    done = run_py(*args, python_flags=("-X", "importtime"))
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert seconds < 3.0, f"run.py {' '.join(args)} took {seconds:.1f}s"
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert imported, "no -X importtime output"
    heavy = sorted({name for name in imported if name.split(".")[0] == "litellm"})
    assert not heavy, f"run.py {' '.join(args)} imported {heavy[:5]}"
    assert "litellm" not in done.stderr
    if "--cfg" in args:
        cfg = OmegaConf.create(done.stdout)
        assert isinstance(cfg, DictConfig)
        assert cfg.name == "math"
        assert cfg.validate.scorer == "numeric"
    else:
        assert "experiment" in done.stdout or "model" in done.stdout


# -- every config mistake: one line naming the key, the value and the closest valid ones, exit 2 -----------

MISTAKES = [
    # (override, what the line must name: the key, the bad value, the suggestion)
    ("generate.concurency=5", ("generate.concurency", "5", "did you mean model.limits.concurrency?")),
    ("+generate.concurency=5", ("generate.concurency", "5", "did you mean model.limits.concurrency?")),
    ("+generate.temprature=0.5", ("generate.temprature", "0.5", "did you mean generate.temperature?")),
    ("+model.limits.concurrrency=3", ("model.limits.concurrrency", "did you mean model.limits.concurrency?")),
    ("+foo=1", ("foo=1", "no such key", "--cfg job")),
    ("+experiment=mathh", ("+experiment=mathh", "did you mean math?", "extract")),
    ("+experiment=nope", ("+experiment=nope", "math_sweep")),
    ("model=fak", ("model=fak", "did you mean fake?", "openai_gpt4o_mini")),
    ("generate.temperature=abc", ("generate.temperature", "abc", "a number")),
    ("ingest.limit=ten", ("ingest.limit", "ten", "an integer")),
    ("generate.use_schema=maybe", ("generate.use_schema", "maybe", "true or false")),
    ("export.dedupe=answr", ("export.dedupe", "answr", "did you mean answer?")),
    ("export.reasoning=kep", ("export.reasoning", "kep", "did you mean keep?")),
    ("export.is_correct=tru", ("export.is_correct", "tru", "did you mean true?")),
    ("export.formats=[openai_chat,alpacca]", ("export.formats", "alpacca", "did you mean alpaca?")),
    ("generate.cache=of", ("generate.cache", "did you mean off?")),
    ("model.transport=drect", ("model.transport", "drect", "did you mean direct?")),
    ("model.response_format=json", ("model.response_format", "json_schema")),
    ("ingest.dedupe=questions", ("ingest.dedupe", "did you mean question?")),
    ("ingest.on_duplicate=keep", ("ingest.on_duplicate", "keep_first")),
    ("ingest.format=csvv", ("ingest.format", "did you mean csv")),
    ("ingest.documents.unit=token", ("ingest.documents.unit", "did you mean tokens?")),
    ("validate.scorer=numerc", ("validate.scorer", "did you mean numeric?")),
    ("pipeline.stages=[ingest,exprt]", ("pipeline.stages", "exprt", "did you mean export?")),
    ("pipeline.force=[valdate]", ("pipeline.force", "did you mean validate?")),
]


def assert_one_line(done: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 2 and exactly one line on the terminal, naming everything in `names`; no Hydra block."""
    assert_usage_error(done, *names)
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    assert len(lines) == 1, f"{len(lines)} lines:\n{done.stderr}{done.stdout}"
    assert lines[0].startswith("error: ")
    assert "HYDRA_FULL_ERROR" not in lines[0]
    return lines[0]


@pytest.mark.parametrize(("override", "names"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_one_line_before_anything_is_written(
    tmp_path: Path, override: str, names: tuple[str, ...]
) -> None:
    run_dir = tmp_path / "run"
    done = run_py("+experiment=math", "model=fake", override, f"hydra.run.dir={run_dir}")
    assert_one_line(done, *names)
    assert not run_dir.exists(), "nothing is written for a config that is refused"


SWEPT_MISTAKES = [
    # the bad value is in the last job only: still refused before the first job starts
    ("export.dedupe=none,answr", ("export.dedupe=answr", "did you mean answer?")),
    ("+generate.concurency=5,6", ("generate.concurency=5", "did you mean model.limits.concurrency?")),
    ("model=fake,fak", ("model=fak", "did you mean fake?")),
    ("generate.temperature=0,abc", ("generate.temperature=abc", "a number")),
    ("generate.workers=1,0", ("generate.workers=0: must be at least 1",)),
]


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
@pytest.mark.parametrize(("override", "names"), SWEPT_MISTAKES, ids=[m[0] for m in SWEPT_MISTAKES])
def test_a_mistake_in_any_job_of_a_sweep_is_refused_before_the_first_job(
    tmp_path: Path, override: str, names: tuple[str, ...], launcher: str
) -> None:
    sweep_dir = tmp_path / "sweep"
    done = run_py(
        "-m",
        "+experiment=math",
        f"hydra/launcher={launcher}",
        "generate.dry_run=true",
        override,
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.output_dir={tmp_path / 'outputs'}",
    )
    assert_one_line(done, *names)
    assert not sweep_dir.exists(), "no sweep folder (and no job) for a refused sweep"


def test_open_keys_stay_open_and_choices_ignore_case(hydra_conf: None) -> None:
    """`ingest.columns.*` and `ingest.xml.fields.*` take any key; `export.is_correct=true` (a bool to Hydra)
    is a valid choice; declared keys added with `+` are fine, undeclared ones are refused."""
    from pipeline.config_check import check
    from pipeline.errors import UserError

    def composed(*overrides: str) -> DictConfig:
        cfg = compose(config_name="config", overrides=list(overrides))
        check(cfg)
        return cfg

    cfg = composed("+ingest.columns.difficulty=level", "+ingest.xml.fields.level=@level", "export.is_correct=true")
    assert cfg.ingest.columns.difficulty == "level"
    composed("validate.scorer={_target_: my_scorers.contains}")
    typo = r"^ingest\.csv\.delimeter=x: no such key; did you mean ingest\.csv\.delimiter\?$"
    with pytest.raises(UserError, match=typo):
        composed("+ingest.csv.delimeter=x")
    with pytest.raises(UserError, match=r"^export\.is_correct=maybe: not one of any, not_false, true$"):
        composed("export.is_correct=maybe")


def test_fixed_choices_are_enums_equal_to_their_text(hydra_conf: None) -> None:
    cfg = compose_typed(["+experiment=math", "export.dedupe=answer", "generate.cache=read_only"])
    from enum import StrEnum

    for value in (cfg.export.dedupe, cfg.generate.cache, cfg.ingest.format, cfg.model.transport, cfg.export.formats[0]):
        assert isinstance(value, StrEnum)
    assert cfg.export.dedupe == "answer" and cfg.generate.cache == "read_only" and f"{cfg.ingest.format}" == "jsonl"


def test_did_you_mean_prefers_the_leaf_across_sections() -> None:
    from pipeline.config_check import closest, schema_keys

    keys = schema_keys()
    assert "model.limits.concurrency" in keys and "export.split.stratify" in keys and "model.limits" in keys
    assert closest("generate.concurency", keys) == ["model.limits.concurrency"]
    assert closest("generate.temprature", keys) == ["generate.temperature"]
    assert closest("export.formts", keys) == ["export.formats"]
    assert closest("zzz", keys) == []


# -- number ranges: field metadata, checked with the config before any stage runs -------------------------


def bounded_fields(schema: type = Config, prefix: str = "") -> Iterator[tuple[str, type, dict[str, Any]]]:
    """(dotted key, the number type, the field's metadata) for every field that declares a range."""
    from pipeline.config_check import BOUNDS

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if BOUNDS.keys() & f.metadata.keys() or "min_items" in f.metadata:
            kinds = [a for a in (hint, *typing.get_args(hint)) if a in (int, float)]
            kinds += [a for arg in typing.get_args(hint) for a in typing.get_args(arg) if a in (int, float)]
            yield f"{prefix}{f.name}", (kinds or [object])[0], dict(f.metadata)
        inner = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
        if isinstance(inner, type) and typing.get_origin(hint) is not list:
            yield from bounded_fields(inner, f"{prefix}{f.name}.")


BOUNDED = sorted(bounded_fields())


def test_every_field_metadata_key_is_one_the_checker_knows() -> None:
    """A typo in metadata (`{"mni": 1}`) would silently disable a bound: every key must be a known one, every
    bound a number on a number field (or a list of numbers)."""
    from pipeline.config_check import BOUNDS, METADATA_KEYS

    def fields(schema: type, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            yield f"{prefix}{f.name}", dict(f.metadata)
            for arg in (hints[f.name], *typing.get_args(hints[f.name])):
                if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                    yield from fields(arg, f"{prefix}{f.name}.")

    seen = list(fields(Config))
    assert len(seen) > 100 and any(key == "generate.workers" for key, _ in seen)
    for key, metadata in seen:
        assert set(metadata) <= METADATA_KEYS, f"{key}: unknown metadata {set(metadata) - METADATA_KEYS}"
        for bound in BOUNDS.keys() & metadata.keys():
            assert isinstance(metadata[bound], int | float), f"{key}: {bound}={metadata[bound]!r} is not a number"
    assert {key for key, _, _ in BOUNDED} >= {
        "generate.workers", "generate.samples", "generate.ray.tasks", "generate.observer_queue", "ingest.limit",
        "ingest.sample", "ingest.documents.chunk_size", "validate.judge.max_tokens", "model.limits.concurrency",
    }  # fmt: skip
    for key, kind, metadata in BOUNDED:
        assert kind in (int, float) or not BOUNDS.keys() & metadata.keys(), f"{key}: a range on no number field"
        if "min" in metadata and "max" in metadata:
            assert metadata["min"] < metadata["max"], key


def _outside_values(kind: type, metadata: dict[str, Any]) -> list[Any]:
    """Values just outside each declared bound (and an empty list where one item is the least)."""
    step = 1 if kind is int else 0.5
    bad: list[Any] = []
    if "min" in metadata:
        bad.append(metadata["min"] - step)
    if "max" in metadata:
        bad.append(metadata["max"] + step)
    if "above" in metadata:
        bad.append(metadata["above"])
    return bad


def _edge_values(metadata: dict[str, Any]) -> list[Any]:
    """The bounds themselves where they are allowed."""
    return [metadata[key] for key in ("min", "max") if key in metadata]


@pytest.mark.parametrize(("key", "kind", "metadata"), BOUNDED, ids=[b[0] for b in BOUNDED])
def test_every_declared_bound_is_refused_by_the_check(
    hydra_conf: None, key: str, kind: type, metadata: dict[str, Any]
) -> None:
    from pipeline.config_check import check
    from pipeline.errors import UserError

    is_list = key == "repair.temperatures"  # the one bounded list
    base = ["+experiment=math", "model=fake"]
    for value in _outside_values(kind, metadata):
        override = f"{key}=[{value}]" if is_list else f"{key}={value}"
        with pytest.raises(UserError) as caught:
            check(compose(config_name="config", overrides=[*base, override]))
        line = str(caught.value)
        said = r"(each value )?must be (at least|at most|more than|between) "
        assert re.match(rf"^{re.escape(key)}=\S+: {said}", line), line
    for value in _edge_values(metadata):
        override = f"{key}=[{value}]" if is_list else f"{key}={value}"
        try:
            check(compose(config_name="config", overrides=[*base, override]))
        except UserError as exc:  # a check across fields may refuse it (export.split.train=0 adds up to 0)
            assert not str(exc).startswith(f"{key}="), f"the bound itself is refused: {exc}"
    if "min_items" in metadata:
        with pytest.raises(UserError, match=rf"^{re.escape(key)}=\[\]: give at least 1 value$"):
            check(compose(config_name="config", overrides=[*base, f"{key}=[]"]))


# -- fixed choices: a StrEnum field (OmegaConf refuses while composing) or `choices` metadata (config_check) -----


def choice_fields(schema: type = Config, prefix: str = "") -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """(dotted key, its values, whether it is a list) for every key with a fixed set of values."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        args = (hint, *typing.get_args(hint))
        enum = next((a for a in args if isinstance(a, type) and issubclass(a, StrEnum)), None)
        if enum is not None or "choices" in f.metadata:
            values = tuple(e.value for e in enum) if enum is not None else tuple(f.metadata["choices"])
            yield f"{prefix}{f.name}", values, typing.get_origin(hint) is list
        inner = next((a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)), None)
        if inner is not None and typing.get_origin(hint) is not list:
            yield from choice_fields(inner, f"{prefix}{f.name}.")


CHOICES = sorted(choice_fields())


def test_the_keys_with_choices_are_found() -> None:
    keys = {key for key, _, _ in CHOICES}
    assert keys >= {
        "ingest.format", "ingest.dedupe", "ingest.on_duplicate", "ingest.documents.unit", "model.serve",
        "validate.scorer", "export.formats", "export.is_correct", "export.dedupe", "export.reasoning",
        "pipeline.stages", "generate.cache",
    }  # fmt: skip


@pytest.mark.parametrize(("key", "values", "is_list"), CHOICES, ids=[c[0] for c in CHOICES])
def test_every_key_with_choices_refuses_another_value_in_one_line(
    hydra_conf: None, key: str, values: tuple[str, ...], is_list: bool
) -> None:
    """The one place a value outside a key's choices is refused, before any stage runs: composing for a
    StrEnum, config_check for `choices` metadata; the stages no longer check these values themselves."""
    from pipeline.config_check import check, one_line
    from pipeline.errors import UserError

    base = ["+experiment=math", "model=fake"]
    override = f"{key}=[{values[0]},zzz]" if is_list else f"{key}=zzz"
    with pytest.raises(Exception) as caught:
        check(compose(config_name="config", overrides=[*base, override]))
    assert one_line(caught.value) == f"{override}: not one of {', '.join(values)}"
    for value in values:
        override = f"{key}=[{value}]" if is_list else f"{key}={value}"
        try:
            check(compose(config_name="config", overrides=[*base, override]))
        except UserError as exc:  # a check across fields may refuse it (generate.mode=batch needs model.batch)
            assert not str(exc).startswith(f"{key}="), f"a valid choice is refused: {exc}"


def test_an_interpolation_outside_the_choices_is_refused_once_resolved(hydra_conf: None) -> None:
    """Composing checks a StrEnum value only as given; an interpolation's value is judged by config_check once
    resolved, where it resolves before the job, so it too is refused before any stage runs."""
    from pipeline.config_check import check
    from pipeline.errors import UserError

    base = ["+experiment=math", "model=fake"]
    for override, line in (
        ("export.is_correct=${name}", "export.is_correct=${name} (math): not one of any, not_false, true"),
        ("ingest.dedupe=${name}", "ingest.dedupe=${name} (math): not one of json_id, question, none"),
    ):
        with pytest.raises(UserError) as caught:
            check(compose(config_name="config", overrides=[*base, override]))
        assert str(caught.value) == line
    for override in (
        "ingest.dedupe=${export.dedupe}",  # none: a valid value once resolved
        "export.is_correct=${oc.env:DISTILLERY_UNSET_IN_TESTS,true}",
        "export.is_correct=${oc.env:DISTILLERY_UNSET_IN_TESTS}",  # not resolvable: left to the code that reads it
    ):
        check(compose(config_name="config", overrides=[*base, override]))


def test_ranges_leave_null_and_interpolations_alone(hydra_conf: None) -> None:
    """None where the field is Optional means "no limit"; an interpolation is judged once resolved."""
    from pipeline.config_check import check

    overrides = ["ingest.limit=null", "validate.judge.max_tokens=null", "generate.samples=${seed}", "seed=0"]
    check(compose(config_name="config", overrides=["+experiment=math", "model=fake", *overrides]))


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["generate.temperature=2.5"], "generate.temperature=2.5: must be between 0 and 2"),
        (["ingest.limit=0"], "ingest.limit=0: must be at least 1 (or null)"),
        (["model.limits.requests_per_minute=0"], "model.limits.requests_per_minute=0.0: must be more than 0 (or null)"),
        (["validate.tolerance=nan"], "validate.tolerance=nan: must be at least 0"),
        (["repair.temperatures=[0.1,3]"], "repair.temperatures=[0.1, 3.0]: each value must be between 0 and 2"),
        (["export.formats=[]"], "export.formats=[]: give at least 1 value"),
        (
            ["generate.executor=ray", "generate.workers=2"],
            "generate.workers=2 is for generate.executor=local; on Ray the callers are generate.ray.tasks",
        ),
        (
            ["generate.executor=ray", "generate.mode=batch", "model.batch=openai"],
            "generate.mode=batch sends the batches from this process: use generate.executor=local",
        ),
        (
            ["model.fake.error_rate=0.6", "model.fake.rate_429=0.5"],
            "model.fake.error_rate=0.6 and model.fake.rate_429=0.5: must add up to at most 1",
        ),
        (
            ["ingest=documents", "ingest.documents.chunk_size=100"],
            "ingest.documents.chunk_overlap=200: must be less than ingest.documents.chunk_size=100",
        ),
        (
            ["export.split.train=0.7", "export.split.test=0.2"],
            "export.split: train=0.7, validation=0.0, test=0.2 must add up to 1",
        ),
        (
            ["export.formats=[csv,openai_chat,csv]"],
            "export.formats=[csv, openai_chat, csv] names csv twice: list each format once",
        ),
    ],
)
def test_range_and_cross_field_lines(hydra_conf: None, overrides: list[str], line: str) -> None:
    from pipeline.config_check import check
    from pipeline.errors import UserError

    with pytest.raises(UserError) as caught:
        check(compose(config_name="config", overrides=["+experiment=math", "model=fake", *overrides]))
    assert str(caught.value) == line


def test_cross_field_checks_pass_what_goes_together(hydra_conf: None) -> None:
    from pipeline.config_check import check

    for overrides in (
        ["generate.executor=ray", "generate.workers=1", "generate.ray.tasks=3"],
        ["generate.workers=4"],
        ["ingest.documents.chunk_size=100"],  # not read unless ingest=documents
        ["ingest=documents", "ingest.documents.chunk_size=300", "ingest.documents.chunk_overlap=0"],
        ["export.split.train=0.8", "export.split.validation=0.1", "export.split.test=0.1"],
        ["model.fake.error_rate=0.5", "model.fake.rate_429=0.5"],
    ):
        check(compose(config_name="config", overrides=["+experiment=math", "model=fake", *overrides]))


RANGE_MISTAKES = [
    # what used to fail only once its stage ran, after earlier stages had written their tables; and values outside
    # a key's choices, which the stages used to check again themselves
    ("ingest.dedupe=questions", "ingest.dedupe=questions: not one of json_id, question, none; did you mean question?"),
    ("export.is_correct=maybe", "export.is_correct=maybe: not one of any, not_false, true"),
    ("ingest.dedupe=${name}", "ingest.dedupe=${name} (math): not one of json_id, question, none"),
    (
        "validate.scorer=numerc",
        "validate.scorer=numerc: not one of exact, normalized_text, numeric, json_field, none; did you mean numeric?",
    ),
    ("generate.workers=0", "generate.workers=0: must be at least 1"),
    ("generate.samples=0", "generate.samples=0: must be at least 1"),
    ("generate.observer_queue=0", "generate.observer_queue=0: must be at least 1"),
    ("generate.ray.tasks=0", "generate.ray.tasks=0: must be at least 1"),
    ("ingest.sample=0", "ingest.sample=0: must be at least 1 (or null)"),
    ("validate.judge.max_tokens=0", "validate.judge.max_tokens=0: must be at least 1 (or null)"),
    ("validate.relative_tolerance=-0.1", "validate.relative_tolerance=-0.1: must be at least 0 (or null)"),
    ("repair.max_rounds=-1", "repair.max_rounds=-1: must be at least 0"),
    ("export.split.train=0.5", "export.split: train=0.5, validation=0.0, test=0.0 must add up to 1"),
    ("export.formats=[alpaca,alpaca]", "export.formats=[alpaca, alpaca] names alpaca twice: list each format once"),
]


@pytest.mark.parametrize(("override", "line"), RANGE_MISTAKES, ids=[m[0] for m in RANGE_MISTAKES])
def test_a_value_out_of_range_is_refused_before_any_stage_runs(tmp_path: Path, override: str, line: str) -> None:
    run_dir = tmp_path / "run"
    done = run_py("+experiment=math", "model=fake", "ingest.limit=3", override, f"hydra.run.dir={run_dir}")
    assert assert_one_line(done) == f"error: {line}"
    assert not (run_dir / "tables").exists(), "a stage ran before the refusal"
    assert not run_dir.exists(), "nothing is written for a config that is refused"


def test_python_api_refuses_a_range_before_any_stage_runs(tmp_path: Path) -> None:
    """`pipeline.api.run` goes through the same check (in a subprocess: this module's Hydra is initialised)."""
    run_dir = tmp_path / "api"
    overrides = ["model=fake", "ingest.limit=3", "generate.workers=0", f"paths.output_dir={tmp_path / 'outputs'}"]
    code = (
        "import sys\nfrom pipeline import api\ntry:\n"
        f"    api.run('math', {overrides!r}, run_dir={str(run_dir)!r})\n"
        "except api.DistilleryError as exc:\n    print(exc.exit_code, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=run_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True
    )
    assert done.stdout.strip().splitlines()[-1] == "2 generate.workers=0: must be at least 1", done.stderr[-2000:]
    assert not (run_dir / "tables").exists()


def test_a_fallback_preset_out_of_range_is_refused_naming_its_file(tmp_path: Path) -> None:
    """Presets named by `model.fallbacks` (or `validate.judge.preset`) are loaded outside Hydra's composing."""
    from pipeline.errors import UserError
    from pipeline.presets import load_preset

    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    preset = conf / "model" / "slow.yaml"
    preset.write_text("name: openai/gpt-4o-mini  # the model\nlimits:  # its limits\n  concurrency: 0  # none\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(preset))}: limits\.concurrency=0: must be at least 1$"):
        load_preset(conf, "slow", Config(paths=PathsConfig(root_dir=str(tmp_path))))
    preset.write_text("name: openai/gpt-4o-mini  # the model\nlimits:  # its limits\n  concurrency: 1  # one\n")
    assert load_preset(conf, "slow", Config(paths=PathsConfig(root_dir=str(tmp_path)))).limits.concurrency == 1
