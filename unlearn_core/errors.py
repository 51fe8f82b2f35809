"""The errors an operator can cause, under one base the UI and the CLI catch.

An `OperatorError` carries a message meant for the person at the browser or the terminal: plain
words, no server paths, no traceback. Anything else that escapes is a bug and is shown as one.
`OperatorError` is a `ValueError`, so code that validates input keeps its familiar contract.
"""

from __future__ import annotations


class OperatorError(ValueError):
    """Bad input or an unmet precondition, with a message for the operator."""


class InvalidInput(OperatorError):
    """A setting, seed, prompt or file name the operator gave is out of bounds."""


class ImageError(OperatorError):
    """An uploaded or named image that cannot be used (missing, too large, not an image)."""


class ModelLoadError(OperatorError):
    """A model that cannot be loaded (not found, not a diffusers folder, not allowed)."""


class AdapterError(OperatorError):
    """An adapter file or folder that does not fit the model."""


class AccessDenied(OperatorError, PermissionError):
    """A path outside what this caller may read (the runs folder, another user's job)."""


class JobNotFound(OperatorError):
    """No job with this id (or not one this caller may see)."""


class JobStateError(OperatorError):
    """An action the job's current state does not allow (cancel a finished job, resume a running one)."""


class NotReady(OperatorError):
    """Something asked for before it exists (a run's adapter before training ends, a target not flagged yet)."""
