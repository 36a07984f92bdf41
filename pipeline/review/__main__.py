"""`python -m pipeline.review`: review a run folder's answers (terminal review, or a CSV sheet round trip).

    python -m pipeline.review tui RUN_DIR [--reviewer NAME] [--invalid] [--mismatched] [--category C] [--unreviewed]
                                  [--judge passed|failed|unjudged|disagrees]   (a run with the LLM judge)
    python -m pipeline.review sheet-export RUN_DIR [-o SHEET.csv] [filters as above]
    python -m pipeline.review sheet-import RUN_DIR SHEET.csv [--reviewer NAME] [--overwrite]
    python -m pipeline.review web RUN_DIR [--reviewer NAME] [--port N]   (or a sweep folder: its leaderboard)

Then re-export with the labels: python run.py <same overrides> hydra.run.dir=RUN_DIR pipeline.stages=[export]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from pipeline import exit_codes
from pipeline.errors import UserError
from pipeline.labels import default_reviewer
from pipeline.review.items import JUDGE_FILTERS, Filters

REVIEWER_HELP = "name on the labels (default: $DISTILLERY_REVIEWER, else your login)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.review", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def filters(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--invalid", action="store_true", help="only answers that failed their schema")
        sub.add_argument("--mismatched", action="store_true", help="only answers that do not match the golden answer")
        sub.add_argument("--category", action="append", default=[], help="only this category (repeatable)")
        sub.add_argument("--unreviewed", action="store_true", help="only answers without a label")
        sub.add_argument(
            "--judge",
            choices=list(JUDGE_FILTERS),
            default=None,
            help="only answers the LLM judge passed, failed, gave no verdict, or whose label it contradicts",
        )

    tui = commands.add_parser("tui", help="review answers one by one in the terminal")
    tui.add_argument("run_dir", type=Path)
    tui.add_argument("--reviewer", default=None, help=REVIEWER_HELP)
    filters(tui)
    export = commands.add_parser("sheet-export", help="write a CSV review sheet")
    export.add_argument("run_dir", type=Path)
    export.add_argument("-o", "--output", type=Path, default=None, help="default: RUN_DIR/review/sheet.csv")
    filters(export)
    imp = commands.add_parser("sheet-import", help="import the labels of a filled-in review sheet")
    imp.add_argument("run_dir", type=Path)
    imp.add_argument("sheet", type=Path)
    imp.add_argument("--reviewer", default=None, help=REVIEWER_HELP)
    imp.add_argument("--overwrite", action="store_true", help="replace other reviewers' conflicting labels")
    web = commands.add_parser("web", help="review in the browser: a local server on 127.0.0.1 with a token")
    web.add_argument("run_dir", type=Path, help="a run folder, or a sweep folder (its leaderboard)")
    web.add_argument("--reviewer", default=None, help=REVIEWER_HELP)
    web.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: any free port)")
    return parser


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(
        invalid=args.invalid,
        mismatched=args.mismatched,
        categories=args.category,
        unreviewed=args.unreviewed,
        judge=args.judge,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(highlight=False)
    try:
        if args.command == "tui":
            from pipeline.review.tui import review

            session = review(args.run_dir, args.reviewer or default_reviewer(), _filters(args), console)
            console.print(
                f"labelled {session.correct + session.incorrect} answer(s) this session "
                f"({session.correct} correct, {session.incorrect} incorrect), saved in {args.run_dir / 'labels'}; "
                f"re-export with: python run.py <same overrides> hydra.run.dir={args.run_dir} pipeline.stages=[export]",
                highlight=False,
                soft_wrap=True,
            )
        elif args.command == "sheet-export":
            from pipeline.review.sheet import export_sheet

            out = args.output or args.run_dir / "review" / "sheet.csv"
            rows = export_sheet(args.run_dir, out, _filters(args))
            console.print(f"wrote {rows} answers to {out}; fill in is_correct (and note), then sheet-import it",
                          highlight=False, soft_wrap=True)  # fmt: skip
        elif args.command == "web":
            import asyncio

            from pipeline.review.web import serve

            asyncio.run(serve(args.run_dir, args.reviewer or default_reviewer(), args.port))
        else:
            from pipeline.review.sheet import import_sheet

            report = import_sheet(args.run_dir, args.sheet, args.reviewer or default_reviewer(), args.overwrite)
            for line in report.lines(args.overwrite):
                console.print(line, highlight=False, soft_wrap=True)
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exit_codes.USAGE
    except KeyboardInterrupt:
        console.print("interrupted: every label given so far is saved")
        return exit_codes.INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
