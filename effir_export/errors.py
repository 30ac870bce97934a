"""User-facing errors: one line naming the problem and the fix."""
from __future__ import annotations


class EffirError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""

    exit_code = 2


class ModelSourceError(EffirError):
    """A model argument could not be resolved or loaded safely."""


class UnsupportedArchitectureError(EffirError):
    """No adapter is registered for a model's ``config.model_type``."""


class RecipeError(EffirError):
    """A recipe file is missing, malformed or does not match the schema."""


class StructureError(EffirError):
    """A requested structural change (drop/resize) is invalid for this model."""


class ExportError(EffirError):
    """An export could not be produced or failed its checks."""


class DatasetError(EffirError):
    """A BEIR folder is missing files or is inconsistent."""
