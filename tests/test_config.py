"""Config tests: every experiment and group option composes into the typed schema, every YAML key is
documented, typos fail as usage errors (exit 2) naming the key, and `--help` / `--cfg` stay fast."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import config_store
from pipeline.config import Config

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
