"""The interactive terminal review: one answer at a time, one key per decision, every decision saved at once.

Never a pipeline stage (a stage must not wait for a keyboard): it runs on a finished run folder. Each key
press that labels appends one line to the label log before the next answer is shown, so quitting, Ctrl+C or
a crash loses nothing. Undo appends a label restoring the previous value and goes back to that answer. A
note (`n`) is kept with the answer's label by whichever key leaves the answer (label, skip, back, go to,
undo, quit), so a note is never lost by skipping or quitting after typing it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from pipeline.errors import UserError
from pipeline.labels import LabelWriter
from pipeline.review.items import Filters, RunTables, judge_text, pretty_answer, short_rationale

KEYS = "[c] correct [i] incorrect [s] skip [b] back [g] go to [u] undo [n] note [q] quit"


@dataclass
class Step:
    """One decision, enough to undo it."""

    index: int
    response_id: str
    before: tuple[bool | None, str | None]
    counted: bool = True  # a label (counted as correct/incorrect), not a note alone


@dataclass
class Session:
    ids: list[str]
    state: dict[str, tuple[bool | None, str | None]]  # response_id -> (is_correct, note) as labelled now
    index: int = 0
    history: list[Step] = field(default_factory=list)
    correct: int = 0
    incorrect: int = 0
    message: str = ""


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Single key presses without Enter; Ctrl+C still interrupts. The terminal is restored on the way out."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_key(fd: int) -> str:
    data = os.read(fd, 1)
    if not data:
        return "q"  # end of input
    if data == b"\x1b":  # an escape sequence (arrow keys): read it whole, ignore it
        os.read(fd, 8)
        return ""
    return data.decode(errors="ignore").lower()


def _label_text(value: bool | None) -> Text:
    if value is None:
        return Text("not reviewed", style="dim")
    return Text("correct", style="bold green") if value else Text("incorrect", style="bold red")


def judge_line(item: dict[str, Any]) -> Text:
    """The LLM judge's verdict and score, and its rationale cut short."""
    passed = item["judge_passed"]
    style = "dim" if passed is None else "bold green" if passed else "bold red"
    line = Text.assemble(("judge ", "dim"), (judge_text(item), style))
    if item["judge_model"]:
        line.append(f" ({item['judge_model']})", style="dim")
    if item["judge_rationale"]:
        line.append(f": {short_rationale(item)}")
    return line


def render(console: Console, session: Session, item: dict[str, Any], filters: Filters, judged: bool = False) -> None:
    console.clear()
    total = len(session.ids)
    console.rule(Text(f"answer {session.index + 1}/{total}  ({filters.describe()})"))
    facts = Text.assemble(
        ("question ", "dim"), str(item["question_id"]),
        ("   category ", "dim"), str(item["category"]),
        ("   model ", "dim"), str(item["model_used"]),
        ("   sample ", "dim"), str(item["sample_index"]),
        ("   round ", "dim"), str(item["round"]),
    )  # fmt: skip
    console.print(facts)
    console.print(Panel(Text(str(item["question"])), title="question", title_align="left"))
    golden = item["golden_answer"]
    console.print(Panel(Text("(none)" if golden is None else str(golden)), title="golden answer", title_align="left"))
    answer = pretty_answer(item)
    body: Any = Syntax(answer, "json", word_wrap=True) if item["parsed"] is not None else Text(answer)
    console.print(Panel(body, title="answer", title_align="left"))
    if item["is_valid"]:
        validation = Text("valid", style="green")
    else:
        validation = Text("invalid: ", style="red")
        validation.append("; ".join(f"{e['path']}: {e['message']}" for e in item["errors"] or []))
    if item["score"] is None:
        score = Text("not scored", style="dim")
    else:
        score = Text(f"score {item['score']:g}, ")
        score.append("matches golden" if item["matches_golden"] else "does not match golden")
    value, note = session.state.get(item["response_id"], (None, None))
    label = Text.assemble(("label ", "dim"), _label_text(value))
    if note:
        label.append(f"   note: {note}")
    lines = [validation, score, *([judge_line(item)] if judged else []), label]
    console.print(Group(*lines))
    if session.message:
        console.print(Text(session.message, style="yellow"))
    console.print(Text(KEYS, style="bold"))


def _ask_line(fd: int, console: Console, prompt: str) -> str:
    """A line of text, typed with the terminal back in its normal mode."""
    saved = termios.tcgetattr(fd)
    try:
        termios.tcsetattr(fd, termios.TCSADRAIN, _cooked(saved))
        console.print(prompt, end="")
        return sys.stdin.readline().strip()
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _cooked(attrs: list[Any]) -> list[Any]:
    cooked = list(attrs)
    cooked[3] = cooked[3] | termios.ICANON | termios.ECHO
    return cooked


@dataclass
class Decisions:
    """What the keys do to the session and the label log; every change is appended before it shows."""

    session: Session
    writer: LabelWriter
    reviewer: str
    pending_note: str | None = None

    def label(self, value: bool) -> None:
        rid = self.session.ids[self.session.index]
        before = self.session.state.get(rid, (None, None))
        note = self.pending_note if self.pending_note is not None else before[1]
        self.writer.append(rid, value, self.reviewer, note)
        self.session.history.append(Step(self.session.index, rid, before))
        self.session.state[rid] = (value, note)
        self.session.correct += value
        self.session.incorrect += not value
        self.pending_note = None
        self.session.index += 1

    def leave(self) -> None:
        """Before showing another answer (or quitting): a note typed for this one is saved with its label."""
        if self.pending_note is None:
            return
        rid = self.session.ids[self.session.index]
        before = self.session.state.get(rid, (None, None))
        self.writer.append(rid, before[0], self.reviewer, self.pending_note, action="note")
        self.session.history.append(Step(self.session.index, rid, before, counted=False))
        self.session.state[rid] = (before[0], self.pending_note)
        self.pending_note = None

    def go(self, index: int) -> None:
        self.leave()
        self.session.index = index

    def undo(self) -> None:
        session = self.session
        if not session.history:
            session.message = "nothing to undo"
            return
        step = session.history.pop()
        self.leave()  # the note typed here is saved (and is the next thing undo takes back)
        undone = session.state.get(step.response_id, (None, None))[0]
        self.writer.append(step.response_id, step.before[0], self.reviewer, step.before[1], action="undo")
        session.state[step.response_id] = step.before
        if step.counted:
            session.correct -= undone is True
            session.incorrect -= undone is False
        session.index = step.index
        session.message = "undone"


def _jump_target(text: str, total: int) -> int | None:
    """The 0-based index for an answer number typed by the user, or None when it is not one."""
    return int(text) - 1 if text.isdigit() and 1 <= int(text) <= total else None


def review(run_dir: Path, reviewer: str, filters: Filters, console: Console | None = None) -> Session:
    """Run the review loop on the terminal; returns the session (what was labelled)."""
    if not sys.stdin.isatty():
        raise UserError(
            "the review needs an interactive terminal; for batch review use: "
            "python -m pipeline.review sheet-export RUN_DIR, then sheet-import"
        )
    console = console or Console()
    tables = RunTables(run_dir, filters)
    writer = LabelWriter(run_dir, source="tui")
    try:
        ids = tables.ids(filters)
        current = tables.current(ids)
        session = Session(ids=ids, state={k: (v["is_correct"], v["note"]) for k, v in current.items()})
        if not ids:
            console.print(f"nothing to review in {run_dir} ({filters.describe()})")
            return session
        fd = sys.stdin.fileno()
        decide = Decisions(session, writer, reviewer)
        with cbreak(fd):
            try:
                while session.index < len(ids):
                    render(console, session, tables.item(ids[session.index]), filters, tables.has_judge)
                    session.message = ""
                    key = read_key(fd)
                    if key in ("c", "i", "x"):
                        decide.label(key == "c")
                    elif key in ("s", " "):
                        decide.go(session.index + 1)
                    elif key == "b":
                        if session.index == 0:
                            session.message = "this is the first answer"
                        else:
                            decide.go(session.index - 1)
                    elif key == "g":
                        typed = _ask_line(fd, console, f"go to answer (1-{len(ids)}): ")
                        target = _jump_target(typed, len(ids))
                        if target is None:
                            session.message = f"no answer {typed!r}: give a number from 1 to {len(ids)}"
                        else:
                            decide.go(target)
                    elif key == "u":
                        decide.undo()
                    elif key == "n":
                        decide.pending_note = _ask_line(fd, console, "note (Enter to keep): ") or None
                        note = decide.pending_note
                        session.message = f"note for this answer (saved when you leave it): {note}" if note else ""
                    elif key == "q":
                        break
            finally:
                if session.index < len(ids):
                    decide.leave()  # quitting, Ctrl+C or the end of input leave the answer too
        return session
    finally:
        writer.close()
        tables.close()
