"""The pipeline's stages, in the order they run. Each module declares one `STAGE`."""

from pipeline.stage_api import Stage
from stages import export, generate, ingest, judge, repair, validate

STAGES: dict[str, Stage] = {
    s.name: s for s in (ingest.STAGE, generate.STAGE, repair.STAGE, validate.STAGE, judge.STAGE, export.STAGE)
}
