"""Exceptions raised by hf_taskarith.

Every error names the file, tensor or field it is about, so a user merging 7B+ models
can tell at once which input is wrong. The CLI prints ``str(error)`` on one line.
"""

from __future__ import annotations


class TaskArithError(Exception):
    """Base class of every error hf_taskarith raises on bad input."""


class ModelReferenceError(TaskArithError):
    """A model reference (Hub id, ``id@revision`` or local folder) could not be resolved."""


class CheckpointError(TaskArithError):
    """A checkpoint file is missing, corrupt, truncated or unsafe to load."""


class IncompatibleTensorsError(TaskArithError):
    """Two inputs disagree on a tensor: shape mismatch, missing tensor, other architecture."""


class UnsupportedAdapterError(TaskArithError):
    """A PEFT adapter uses a type or option hf_taskarith cannot turn into a task vector."""


class OutputExistsError(TaskArithError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


class RecipeError(TaskArithError):
    """A merge recipe is invalid."""
