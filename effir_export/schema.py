"""The base of every config object (import it from here in stage modules: recipe.py imports them)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config object: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
