"""The dataset card's Hub line: the one part of `export/README.md` that changes when the export is published.

The export stage renders the card with `hub_line` (the recorded Hub id, or how to publish); `pipeline.publish`
swaps that line in the card it uploads with `with_hub_id`. Both sides live here, outside the stage, because
the framework never imports a stage. Pure text functions.
"""

from __future__ import annotations

CARD_FILE = "README.md"  # the card, in the export folder: the file the Hugging Face Hub shows
HUB_HEADING = "## Hugging Face Hub"
HUB_URL = "https://huggingface.co/datasets/"


def hub_line(repo_id: str | None) -> str:
    """The one line of the card that depends on the Hub id (`with_hub_id` swaps it after publishing)."""
    if repo_id is None:
        return (
            "Not published yet: `python -m pipeline.publish RUN_DIR --repo-id ORG/NAME` uploads this folder "
            "and records its id here."
        )
    return (
        f'Published as [`{repo_id}`]({HUB_URL}{repo_id}): `load_dataset("{repo_id}")` loads the default '
        f'config, `load_dataset("{repo_id}", CONFIG)` another.'
    )


def with_hub_id(card: str, repo_id: str) -> str:
    """The card as the export stage renders it once `repo_id` is recorded (what `pipeline.publish` uploads)."""
    lines = card.split("\n")
    if HUB_HEADING not in lines:
        raise ValueError(f"the card has no {HUB_HEADING!r} section")
    lines[lines.index(HUB_HEADING) + 2] = hub_line(repo_id)
    return "\n".join(lines)
