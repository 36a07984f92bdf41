"""Every config mistake becomes one line before any stage runs: the key, the bad value, the closest valid keys.

Two halves. `ConfigCheck`, a Hydra callback, checks what composing cannot: keys added with `+` that the
schema does not declare (Hydra's `+` bypasses the schema's struct mode), text values outside their field's
`choices` metadata (and an interpolation's outside a StrEnum's values, which composing checks only when
given as they are), numbers outside their field's `min`/`max`/`above` metadata, and
values that cannot go together (`generate.workers=2` with `generate.executor=ray`). In a sweep it composes
every job's config before the first job starts (and before the sweep folder exists), so a bad value in the
last job fails as early as the first.
`one_line` turns Hydra's and OmegaConf's composition errors (unknown key, unknown group option or
experiment, wrong type, a value outside an Enum) into the line `run.py` prints; `run.py` has Hydra raise
them (`HYDRA_FULL_ERROR`) instead of printing its own block.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import typing
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from pipeline.config import Config
from pipeline.errors import JobExit, UserError
from pipeline.exit_codes import USAGE

HINT = "python run.py --cfg job lists every key"
BOUNDS = {"min": "at least", "max": "at most", "above": "more than"}  # field metadata -> how the line says it
METADATA_KEYS = frozenset({"choices", "min_items", *BOUNDS})  # every metadata key a schema field may carry
Resolve = Callable[[str], Any]  # a dotted key -> its resolved value (None: not resolvable yet)
_accepted = False  # set once the composed config (every job's, in a sweep) passed the checks


def accepted() -> bool:
    """Whether the config was accepted: an error after this is the job's, not the user's config."""
    return _accepted


# -- the schema --------------------------------------------------------------------------------------------


def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds directly or as list items (`few_shot: list[FewShotExample]`), if any."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def schema_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares, sections included (`model.limits`, `model.limits.concurrency`)."""
    keys: list[str] = []
    for name, hint in _hints(schema).items():
        path = f"{prefix}{name}"
        keys.append(path)
        inner = _dataclass_of(hint)
        if inner is not None and typing.get_origin(hint) is not list:
            keys.extend(schema_keys(inner, f"{path}."))
    return keys


def closest(word: str, candidates: list[str], limit: int = 3) -> list[str]:
    """Candidates close to `word` by the whole dotted path or by the last part alone (a typo in a leaf name
    usually lands in the wrong section too: `generate.concurency` means `model.limits.concurrency`)."""
    leaf = word.rsplit(".", 1)[-1].lower()

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, word.lower(), candidate.lower()).ratio()
        last = difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1].lower()).ratio()
        return max(whole, last - 0.01)  # on a tie, the whole path wins: it keeps the user's section

    ranked = sorted(((score(c), c) for c in candidates), key=lambda sc: (-sc[0], sc[1]))
    best = ranked[0][0] if ranked else 0.0
    near = [c for s, c in ranked[:limit] if s >= max(0.75, best - 0.05)]
    section = word.rsplit(".", 1)[0] + "." if "." in word else ""
    same = [c for c in near if section and c.startswith(section)]
    return same or near  # a close key in the user's own section beats one elsewhere


def did_you_mean(word: str, candidates: list[str], what: str) -> str:
    near = closest(word, candidates)
    if near:
        return f"did you mean {' or '.join(near)}?"
    return what


def _shown(value: Any) -> str:
    text = value.value if isinstance(value, Enum) else value
    if isinstance(text, list) and not any(isinstance(item, dict | list) for item in text):
        text = f"[{', '.join(_shown(item) for item in text)}]"
    text = text if isinstance(text, str) else OmegaConf.to_yaml(text).strip() if isinstance(text, dict | list) else text
    text = str(text).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


# -- what composing cannot catch -------------------------------------------------------------------------


def _problems(node: Any, schema: type, prefix: str, resolve: Resolve | None = None) -> Iterator[str]:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = _hints(schema)
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in fields:
            near = did_you_mean(path, schema_keys(), HINT)
            yield f"{path}={_shown(value)}: no such key; {near}"
            continue
        allowed = fields[key].metadata.get("choices") or _enum_values(hints[key])
        given = resolve(path) if resolve is not None and _interpolated(value) else value
        if allowed and _outside(given, allowed):
            near = did_you_mean(str(given), list(allowed), "")
            shown = _shown(value) + (f" ({_shown(given)})" if given is not value else "")
            yield f"{path}={shown}: not one of {', '.join(allowed)}" + (f"; {near}" if near else "")
        bounded = _out_of_bounds(value, fields[key].metadata, optional=type(None) in typing.get_args(hints[key]))
        if bounded:
            yield f"{path}={_shown(value)}: {bounded}"
        inner = _dataclass_of(hints[key])
        if inner is None:
            continue
        if isinstance(value, dict):
            yield from _problems(value, inner, f"{path}.", resolve)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _problems(item, inner, f"{path}[{i}].", resolve)


def _enum_values(hint: Any) -> tuple[str, ...] | None:
    """A StrEnum field's values: composing checks a value given as is, not one an interpolation gives."""
    enum = next((a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and issubclass(a, Enum)), None)
    return tuple(str(e.value) for e in enum) if enum is not None else None


def _interpolated(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _outside(value: Any, allowed: tuple[str, ...]) -> bool:
    """A text value not in `allowed` (any case: `export.is_correct=true` reaches us as "True"); an
    interpolation that could not be resolved is judged by the code that reads it; a dict (`validate.scorer`'s
    function form) is open."""
    if not isinstance(value, str | bool) or _interpolated(value):
        return False
    return str(value).lower() not in allowed


def _resolver(cfg: DictConfig) -> Resolve:
    """The value at a dotted key once resolved, or None where it resolves only inside the job (`${hydra:...}`).
    Resolved in an untyped copy, so that a StrEnum key gives its text rather than OmegaConf's own error."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))

    def resolve(path: str) -> Any:
        try:
            return OmegaConf.select(plain, path)
        except OmegaConfBaseException:
            return None

    return resolve


def _number(value: Any) -> float | None:
    """A number as the config holds it; None for an interpolation (judged once resolved) or anything else."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _inside(number: float, metadata: Any) -> bool:
    """Whether `number` keeps the field's bounds (written `not >=` so that NaN never passes)."""
    too_low = "min" in metadata and not number >= metadata["min"]
    too_high = "max" in metadata and not number <= metadata["max"]
    return not (too_low or too_high or ("above" in metadata and not number > metadata["above"]))


def _out_of_bounds(value: Any, metadata: Any, optional: bool) -> str | None:
    """What is wrong with a number (or a list of numbers) outside its field's bounds, as the line says it."""
    if isinstance(value, list) and len(value) < metadata.get("min_items", 0):
        return f"give at least {metadata['min_items']} value{'s' if metadata['min_items'] > 1 else ''}"
    if not BOUNDS.keys() & metadata.keys():
        return None
    numbers = [n for item in (value if isinstance(value, list) else [value]) if (n := _number(item)) is not None]
    if all(_inside(n, metadata) for n in numbers):
        return None
    if "min" in metadata and "max" in metadata:
        allowed = f"between {metadata['min']} and {metadata['max']}"
    else:
        allowed = " and ".join(f"{said} {metadata[key]}" for key, said in BOUNDS.items() if key in metadata)
    each = "each value " if isinstance(value, list) else ""
    return f"{each}must be {allowed}" + (" (or null)" if optional else "")


def check_section(node: Any, schema: type, where: str) -> None:
    """Refuse a value outside its bounds or choices in a config section loaded outside Hydra's composing (a
    preset named by `model.fallbacks` or `validate.judge.preset`), naming the file it came from."""
    tree = OmegaConf.to_container(node, resolve=False)
    for problem in _problems(tree, schema, ""):
        raise UserError(f"{where}: {problem}")


def check(cfg: DictConfig) -> None:
    """Refuse keys the schema does not declare, text values outside their `choices` (an interpolation's once
    resolved, where it resolves before the job) and numbers outside their range (the first found), and values
    that cannot go together."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(tree, dict)
    tree.pop("hydra", None)
    for problem in _problems(tree, Config, "", _resolver(cfg)):
        raise UserError(problem)
    _check_batch_mode(tree)
    _check_ray(tree)
    _check_chunks(tree)
    _check_split(tree)
    _check_formats(tree)
    _check_fake_faults(tree)


def _check_batch_mode(tree: dict[Any, Any]) -> None:
    """`generate.mode=batch` needs a preset whose endpoint has a batch API (`model.batch`)."""
    generate, model = tree.get("generate") or {}, tree.get("model") or {}
    if str(generate.get("mode", "online")).lower() != "batch" or str(model.get("batch", "none")).lower() != "none":
        return
    raise UserError(
        "generate.mode=batch: this model preset has no batch API (model.batch=none); use generate.mode=online, "
        "or set model.batch=openai|anthropic if its endpoint offers one"
    )


def _check_ray(tree: dict[Any, Any]) -> None:
    """On Ray the callers are `generate.ray.tasks`; batches are sent from this process."""
    generate = tree.get("generate") or {}
    if str(generate.get("executor", "local")).lower() != "ray":
        return
    if str(generate.get("mode", "online")).lower() == "batch":
        raise UserError("generate.mode=batch sends the batches from this process: use generate.executor=local")
    workers = _number(generate.get("workers"))
    if workers is not None and workers > 1:
        raise UserError(
            f"generate.workers={workers} is for generate.executor=local; on Ray the callers are generate.ray.tasks"
        )


def _check_chunks(tree: dict[Any, Any]) -> None:
    """`ingest=documents`: a chunk repeats less of the one before than its whole size."""
    ingest = tree.get("ingest") or {}
    documents = ingest.get("documents") or {}
    size, overlap = _number(documents.get("chunk_size")), _number(documents.get("chunk_overlap"))
    if str(ingest.get("format")).lower() != "documents" or size is None or overlap is None or overlap < size:
        return
    raise UserError(f"ingest.documents.chunk_overlap={overlap}: must be less than ingest.documents.chunk_size={size}")


def _check_split(tree: dict[Any, Any]) -> None:
    """`export.split`'s fractions share out every exported row."""
    split = (tree.get("export") or {}).get("split") or {}
    fractions = {name: _number(split.get(name)) for name in ("train", "validation", "test")}
    if any(f is None for f in fractions.values()) or abs(sum(f or 0.0 for f in fractions.values()) - 1.0) <= 1e-9:
        return
    shown = ", ".join(f"{name}={f}" for name, f in fractions.items())
    raise UserError(f"export.split: {shown} must add up to 1")


def _check_formats(tree: dict[Any, Any]) -> None:
    """`export.formats`: each format once (each writes one file per split)."""
    formats = [str(f) for f in (tree.get("export") or {}).get("formats") or []]
    repeated = sorted({f for f in formats if formats.count(f) > 1})
    if repeated:
        raise UserError(
            f"export.formats=[{', '.join(formats)}] names {', '.join(repeated)} twice: list each format once"
        )


def _check_fake_faults(tree: dict[Any, Any]) -> None:
    """`model.fake`'s fault shares are of the same calls: together at most all of them."""
    fake = (tree.get("model") or {}).get("fake") or {}
    errors, throttled = _number(fake.get("error_rate")), _number(fake.get("rate_429"))
    if errors is None or throttled is None or errors + throttled <= 1:
        return
    raise UserError(f"model.fake.error_rate={errors} and model.fake.rate_429={throttled}: must add up to at most 1")


def sweep_arguments(config: DictConfig) -> list[str]:
    """A sweep's arguments as Hydra's basic sweeper takes them: `hydra.sweeper.params` (an experiment's grid),
    then the command line's overrides."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return [f"{key}={value}" for key, value in params.items()] + [str(o) for o in config.hydra.overrides.task]


def _job_overrides(config: DictConfig) -> list[list[str]]:
    """Each job's overrides of a sweep, the way Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    loader = GlobalHydra.instance().config_loader()
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(sweep_arguments(config))
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def refuse(exc: BaseException) -> typing.NoReturn:
    """Print the one line for a config error and exit 2 (as a JobExit, so the Python API carries the line)."""
    line = one_line(exc)
    print(f"error: {line}", file=sys.stderr)
    raise JobExit(USAGE, line)


class ConfigCheck(Callback):
    """Hydra callback: checks the composed config before the run folder (or the sweep folder) is made.

    Hydra turns a callback's exception into a warning and carries on, so a refusal exits from here.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _accepted
        try:
            check(config)
        except UserError as exc:
            refuse(exc)
        _accepted = True

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _accepted
        try:
            loader = GlobalHydra.instance().config_loader()
            for job in _job_overrides(config):
                check(loader.load_sweep_config(master_config=config, sweep_overrides=job))
        except Exception as exc:
            refuse(exc)
        _accepted = True


# -- Hydra's and OmegaConf's errors as one line ----------------------------------------------------------

_OVERRIDE = re.compile(r"(?:override|argument|use) [+']?([^'\s]+=[^'\n]*)'?")
_TYPES = {"integer": "an integer", "float": "a number", "boolean": "true or false", "bool": "true or false"}
_VALUE = re.compile(r"[Vv]alue '(.*?)'")
_CONVERT = re.compile(r"could not be converted to (\w+)|is not a valid (bool)")
_EXPECTED = re.compile(r"expected one of \[(.*?)\]")
_SOURCE = re.compile(r"^In '([^']+)': ")  # Hydra's prefix for an error inside a config file


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def one_line(exc: BaseException) -> str:
    """The one line for an error raised while Hydra composed the config."""
    chain = _chain(exc)
    if isinstance(exc, UserError):
        return str(exc)
    missing = next((e for e in chain if isinstance(e, MissingConfigException)), None)
    if missing is not None and missing.missing_cfg_file:
        group, _, option = str(missing.missing_cfg_file).rpartition("/")
        options = [str(o) for o in missing.options or []]
        near = did_you_mean(option, options, "")
        prefix = "+" if group == "experiment" else ""
        listing = f"choose one of {', '.join(options)}" if options else f"no options in conf/{group}/"
        return f"{prefix}{group}={option}: no such {group or 'config'}; " + (f"{near} ({listing})" if near else listing)
    override = next((m.group(1) for e in chain if (m := _OVERRIDE.search(str(e)))), None)
    omega = next((e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)), None)
    if omega is not None:
        key = str(omega.full_key)
        text = str(omega)
        value = _VALUE.search(text)
        shown = override or (f"{key}={value.group(1)}" if value else key)
        source = next((m.group(1) for e in chain if (m := _SOURCE.match(str(e)))), None)
        if override is None and source:
            shown = f"{shown} (in {source}.yaml)"
        expected = _EXPECTED.search(text)
        if expected:
            allowed = [a.strip() for a in expected.group(1).split(",")]
            near = did_you_mean(value.group(1) if value else "", allowed, "")
            return f"{shown}: not one of {', '.join(allowed)}" + (f"; {near}" if near else "")
        converted = _CONVERT.search(text)
        if converted:
            kind = (converted.group(1) or converted.group(2)).lower()
            return f"{shown}: {key} must be {_TYPES.get(kind, kind)}"
        if isinstance(omega, ValidationError):
            return f"{shown}: {text.splitlines()[0]}"
        return f"{shown}: no such key; {did_you_mean(key, schema_keys(), HINT)}"
    if isinstance(exc, OverrideParseException):
        return f"cannot read the override: {str(exc).splitlines()[0]}"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return f"{override}: {first}" if override and override not in first else first
