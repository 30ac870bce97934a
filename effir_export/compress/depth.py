"""The depth stage: score sublayers, drop the least important, report what changed."""
from __future__ import annotations

from pathlib import Path

from ..accounting import compare_accounts
from ..models.sources import LoadedModel
from ..schema import StrictModel
from . import StageOutput
from .drop import DropConfig, apply_drops, check_drops, select_drops
from .score import ScoreConfig, score_sublayers, write_scores


class DepthConfig(StrictModel):
    """EffiR's coarse stage.

    ```yaml
    depth:
      score: {samples: 64, max_length: 128, positions: all}
      drop: {mlp: 15, attention: 0}
    ```
    """

    score: ScoreConfig = ScoreConfig()
    drop: DropConfig = DropConfig()


def run_depth_stage(loaded: LoadedModel, config: DepthConfig, recipe, work_dir: Path,
                    progress: bool = True) -> StageOutput:
    """Score ``loaded`` on the recipe's calibration text, drop sublayers in place, write scores."""
    from ..accounting import account

    check_drops(config.drop, loaded.model)
    before = account(loaded.model)
    scores = score_sublayers(loaded, config.score, recipe.resolve_path(config.score.calibration), progress)
    write_scores(scores, work_dir)
    drops = select_drops(scores, config.drop)
    apply_drops(loaded.model, drops)
    after = account(loaded.model)
    report = {"dropped": drops, "scores": "scores.json", **compare_accounts(before, after)}
    return StageOutput(loaded=loaded, report=report)
