"""The judge's figures for the dataset card: pass rate, and agreement with the reviewers' labels.

Agreement is counted over final answers that have both a verdict (`judgements.passed`) and a review label
(the latest `is_correct` of the label log): the 2x2 table of judge pass/fail against reviewer
correct/incorrect, the share where they agree, and Cohen's kappa, which discounts the agreement two raters
would reach by chance given how often each says yes.
"""

from __future__ import annotations

from typing import Any

import duckdb

STEP = "passed by the LLM judge (export.require_judge)"


def cohen_kappa(pass_correct: int, pass_incorrect: int, fail_correct: int, fail_incorrect: int) -> float | None:
    """Cohen's kappa of a 2x2 table (judge pass/fail x reviewer correct/incorrect); None when undefined
    (no answers, or both raters always gave one and the same answer, so chance agreement is 1)."""
    n = pass_correct + pass_incorrect + fail_correct + fail_incorrect
    if n == 0:
        return None
    observed = (pass_correct + fail_incorrect) / n
    judge_pass, reviewer_correct = (pass_correct + pass_incorrect) / n, (pass_correct + fail_correct) / n
    chance = judge_pass * reviewer_correct + (1 - judge_pass) * (1 - reviewer_correct)
    return None if chance >= 1.0 else (observed - chance) / (1 - chance)


def judge_figures(con: duckdb.DuckDBPyConnection, answers: str, judgements: str, removed: int | None) -> dict[str, Any]:
    """Figures over the final answers in table `answers` (response_id, is_correct) and their `judgements`."""
    cursor = con.execute(
        f"""
        SELECT count(j.response_id) AS judged, count(j.passed) AS verdicts,
               count(*) FILTER (j.passed) AS passed, count(*) FILTER (j.status = 'invalid') AS invalid,
               count(*) FILTER (j.status = 'failed') AS failed,
               count(*) FILTER (j.passed AND a.is_correct) AS pass_correct,
               count(*) FILTER (j.passed AND NOT a.is_correct) AS pass_incorrect,
               count(*) FILTER (NOT j.passed AND a.is_correct) AS fail_correct,
               count(*) FILTER (NOT j.passed AND NOT a.is_correct) AS fail_incorrect,
               count(*) AS answers, string_agg(DISTINCT j.judge_model, ', ' ORDER BY j.judge_model) AS models
        FROM {answers} a LEFT JOIN {judgements} j USING (response_id)
        """
    )
    names = [d[0] for d in cursor.description or []]
    row = cursor.fetchall()[0]
    figures: dict[str, Any] = dict(zip(names, row, strict=True))
    cells = [figures[k] for k in ("pass_correct", "pass_incorrect", "fail_correct", "fail_incorrect")]
    figures.update(labelled=sum(cells), agree=cells[0] + cells[3], kappa=cohen_kappa(*cells), removed=removed)
    return figures


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def judge_section(f: dict[str, Any] | None) -> list[str]:
    """The card's "LLM judge" section (nothing when the run has no judgements)."""
    if f is None:
        return []
    out = ["", "## LLM judge", ""]
    out.append(
        f"Judge: {f['models'] or 'none'}. {f['judged']} of {f['answers']} final answers judged; "
        f"{f['passed']} of {f['verdicts']} verdicts passed ({_pct(f['passed'], f['verdicts'])} pass rate)"
        f"; {f['invalid']} verdicts broke the verdict schema, {f['failed']} judge calls failed."
    )
    if f["removed"] is not None:
        out.append(f"export.require_judge removed {f['removed']} answers.")
    if not f["labelled"]:
        out += ["", "No answer has both a verdict and a review label: agreement with reviewers is not measured."]
        return out
    out += ["", f"Agreement with the reviewers (latest label per answer), over {f['labelled']} answers with both:", ""]
    out += [
        "| | reviewer: correct | reviewer: incorrect |",
        "| --- | --- | --- |",
        f"| judge: pass | {f['pass_correct']} | {f['pass_incorrect']} |",
        f"| judge: fail | {f['fail_correct']} | {f['fail_incorrect']} |",
        "",
    ]
    kappa = "undefined (one rater gave a single answer throughout)" if f["kappa"] is None else f"{f['kappa']:.3f}"
    out.append(f"Agree on {f['agree']} of {f['labelled']} ({_pct(f['agree'], f['labelled'])}); Cohen's kappa {kappa}.")
    return out
