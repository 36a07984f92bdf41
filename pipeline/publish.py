"""`python -m pipeline.publish RUN_DIR --repo-id ORG/NAME [--private] [--dry-run]`: the export folder to the Hub.

Uploads `RUN_DIR/export/` as a Hugging Face dataset repository in one commit, with the card naming its Hub id,
and removes files an earlier publish left there that this export no longer has. The token comes only from
`HF_TOKEN`. Everything a user can get wrong (no export, no token, no `huggingface_hub`, a bad repo id) is
checked before any network call. After the commit succeeds, the Hub id is recorded in `RUN_DIR/hub.json` and
the local card is rewritten exactly as the export stage renders it from then on, so the folder and the Hub
hold the same bytes and a rerun of the folder changes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from pipeline import exit_codes, layout
from pipeline.card_hub import CARD_FILE, HUB_URL, with_hub_id
from pipeline.errors import UserError
from pipeline.hub_record import write_repo_id
from pipeline.store import atomic_write_text

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
KEEP_ON_HUB = (".gitattributes",)  # the Hub's own file in every repository


@dataclass(frozen=True)
class Upload:
    """What one publish sends: the export's files (relative path -> size) and the card with the Hub id."""

    export_dir: Path
    files: dict[str, int]
    card: str


def plan(run_dir: Path, repo_id: str) -> Upload:
    """The files to upload and the card to send, or a UserError naming what is missing."""
    if not REPO_ID.match(repo_id):
        raise UserError(f"--repo-id {repo_id!r}: write it as ORG/NAME (letters, digits, '-', '_', '.')")
    export_dir = layout.export_folder(run_dir)
    card_path = export_dir / CARD_FILE
    if not card_path.is_file():
        raise UserError(f"{card_path} does not exist: run the pipeline into {run_dir} first (the export stage)")
    try:
        card = with_hub_id(card_path.read_text(encoding="utf-8"), repo_id)
    except ValueError:
        raise UserError(
            f"{card_path} was written by an older version: rerun its export "
            f"(python run.py <same overrides> hydra.run.dir={run_dir} pipeline.stages=[export] pipeline.force=[export])"
        ) from None
    files = {
        path.relative_to(export_dir).as_posix(): path.stat().st_size
        for path in sorted(export_dir.rglob("*"))
        if path.is_file()
    }
    files[CARD_FILE] = len(card.encode("utf-8"))
    return Upload(export_dir, dict(sorted(files.items())), card)


def _hub_api(token: str) -> Any:
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        raise UserError("huggingface_hub is not installed: pip install -e '.[hub]'") from None
    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: unset it (or set it to 0) to publish")
    return HfApi(token=token)


def upload(api: Any, up: Upload, repo_id: str, private: bool) -> str:
    """One commit with every export file (the card from memory) and deletions of files the export dropped."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    url = api.create_repo(repo_id, repo_type="dataset", private=private or None, exist_ok=True)
    remote = api.list_repo_files(repo_id, repo_type="dataset")
    operations: list[Any] = [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=up.card.encode("utf-8") if name == CARD_FILE else str(up.export_dir / name),
        )
        for name in up.files
    ]
    operations += [
        CommitOperationDelete(path_in_repo=name) for name in remote if name not in up.files and name not in KEEP_ON_HUB
    ]
    api.create_commit(repo_id, operations, commit_message="Publish with distillery", repo_type="dataset")
    return str(url)


def _hub_error(exc: Exception) -> UserError | None:
    """The Hub's refusals and an unreachable Hub, as one line; None for anything else (a bug: traceback)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    transport = {cls.__name__ for cls in type(exc).__mro__} & {"TransportError", "ConnectionError"}
    if transport and not isinstance(exc, HfHubHTTPError):  # httpx's (whichever it is) or the OS's
        return UserError(f"cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}): check the network")
    if not isinstance(exc, HfHubHTTPError):
        return None
    status = getattr(exc.response, "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status in (401, 403):
        return UserError(f"the Hub refused HF_TOKEN ({status}): use a token with write access ({first})")
    return UserError(f"the Hub answered {status}: {first}")


def publish(run_dir: Path, repo_id: str, private: bool, dry_run: bool, console: Console) -> None:
    up = plan(run_dir, repo_id)
    if dry_run:
        for name, size in up.files.items():
            console.print(f"{size:>12}  {escape(name)}", highlight=False, soft_wrap=True)
        console.print(
            f"would upload {len(up.files)} files, {sum(up.files.values())} bytes, to {HUB_URL}{repo_id}"
            + (" (private)" if private else ""),
            highlight=False,
            soft_wrap=True,
        )
        return
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError("HF_TOKEN is not set: export HF_TOKEN=hf_... (a token with write access) and publish again")
    api = _hub_api(token)
    try:
        url = upload(api, up, repo_id, private)
    except Exception as exc:
        error = _hub_error(exc)
        if error is None:
            raise
        raise error from None
    atomic_write_text(up.export_dir / CARD_FILE, up.card)
    write_repo_id(run_dir, repo_id)
    console.print(f"published {len(up.files)} files to {url}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.publish", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repo-id", required=True, help="the Hub dataset repository, ORG/NAME")
    parser.add_argument(
        "--private", action="store_true", help="create the repository private (an existing one keeps its visibility)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the files and sizes; no network call")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    try:
        publish(args.run_dir, args.repo_id, args.private, args.dry_run, console)
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exit_codes.USAGE
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
