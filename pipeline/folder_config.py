"""A run folder owns its configuration: running into an existing folder starts from the overrides that built it.

`manifest.json` keeps the folder's cumulative overrides (`overrides`). `run.py` reads them for the folder named
by `hydra.run.dir=` before Hydra composes and puts the new ones on top, so `python run.py hydra.run.dir=RUN`
resumes or re-exports with the config that made the folder, and a new override of the same key wins (it is
recorded and kept for the next run). Overrides that only say what this invocation does (which stages run,
a dry run) are never stored: they are not part of what built the tables.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException

from pipeline import layout

# Keys that say what one invocation does, not what the folder is; prefixes end with a dot.
INVOCATION_ONLY = ("pipeline.", "generate.dry_run")
RUN_DIR_KEY = "hydra.run.dir"

# The command line as typed, when `with_folder_overrides` put the folder's stored overrides in front of it (run.py
# sets it): the manifest records each invocation as typed. None: the job's own overrides are as typed (a new
# folder, or a multirun job).
typed_arguments: list[str] | None = None


def _line(override: Override) -> str:
    return str(override.input_line)


def _key(override: Override) -> str:
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def _parse(overrides: list[str]) -> list[Override] | None:
    """Hydra's own parse of the overrides; None when one does not parse (Hydra then reports it)."""
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return None


def _invocation_only(key: str) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in INVOCATION_ONLY)


def folder_overrides(task_overrides: list[str]) -> list[str]:
    """The overrides a run folder keeps: this job's task overrides without the invocation-only ones."""
    parsed = _parse(list(task_overrides))
    if parsed is None:
        return list(task_overrides)
    return [_line(o) for o in parsed if not _invocation_only(_key(o))]


def merge(stored: list[str], new: list[str]) -> list[str]:
    """The stored overrides with the new ones on top, as if Hydra applied them all in order, written as one
    list Hydra accepts: a later override of a key replaces the earlier one.

    A `key=v` replacing a `+key=...` (a key the base config lacks) keeps the `+` (or `++`); a `~key` cancels a
    `+key=...` outright, since there is then nothing to delete. The same holds inside the new overrides, so
    `+key=v ~key` typed together leaves nothing behind.
    """
    old, fresh = _parse(stored), _parse(new)
    if old is None or fresh is None:
        return [*stored, *new]
    state: dict[str, tuple[OverrideType, str]] = {}  # key -> (how it first reached the config, its line)
    for o in [*old, *fresh]:
        key, line = _key(o), _line(o)
        before = state.pop(key, None)  # a replaced key moves to the end: the latest order, as typed
        added = before is not None and before[0] in (OverrideType.ADD, OverrideType.FORCE_ADD)
        if o.type == OverrideType.DEL and added:
            continue  # the key came from an earlier `+`: nothing of it is left to delete
        if o.type == OverrideType.CHANGE and added:
            assert before is not None
            state[key] = (before[0], ("+" if before[0] == OverrideType.ADD else "++") + line)
        else:
            state[key] = (o.type, line)
    return [line for _, line in state.values()]


def stored_overrides(run_dir: Path) -> list[str] | None:
    """The cumulative overrides a run folder's manifest keeps; None for a new folder (or one without them)."""
    manifest = layout.manifest_path(run_dir)
    if not manifest.is_file():
        return None
    try:
        stored = json.loads(manifest.read_text(encoding="utf-8")).get("overrides")
    except (OSError, ValueError):
        return None
    return [str(o) for o in stored] if isinstance(stored, list) else None


def with_folder_overrides(argv: list[str]) -> list[str]:
    """The command-line arguments with the stored overrides of the folder named by `hydra.run.dir=` put first.

    A multirun makes a new folder per job, so its arguments are left alone; so are arguments without an
    existing run folder.
    """
    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # arguments Hydra will refuse with its own message
        return argv
    new = list(args.overrides or [])
    parsed = _parse(new)
    if args.multirun or not parsed:
        return argv
    run_dir = next((str(o.value()) for o in parsed if _key(o) == RUN_DIR_KEY), None)
    stored = stored_overrides(Path(run_dir)) if run_dir else None
    if not stored:
        return argv
    flags = list(argv)
    for line in new:  # the overrides are positional: what is left are Hydra's flags and their values
        flags.remove(line)
    return [*flags, *merge(stored, new)]


def typed_overrides(task_overrides: list[str]) -> list[str]:
    """This invocation's overrides as the user typed them (without Hydra's own, like `hydra.run.dir=`)."""
    if typed_arguments is None:
        return list(task_overrides)
    try:
        args, _ = get_args_parser().parse_known_args(typed_arguments)
    except SystemExit:
        return list(task_overrides)
    parsed = _parse(list(args.overrides or [])) or []
    return [_line(o) for o in parsed if not o.is_hydra_override()]
