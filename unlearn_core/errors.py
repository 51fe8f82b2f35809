"""The errors an operator can cause, under one base the UI and the CLI catch.

An `OperatorError` carries a message meant for the person at the browser or the terminal: plain
words, no server paths, no traceback. Anything else that escapes is a bug and is shown as one.
`OperatorError` is a `ValueError`, so code that validates input keeps its familiar contract.
"""

from __future__ import annotations

import re


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


class DamagedRunFile(OperatorError):
    """A file of a run folder that exists but cannot be read (random bytes, broken JSON): named in
    the message, so the page can show the rest of the job without it."""


class DiskFull(OperatorError, OSError):
    """A write that found no space left on the disk (or the user's quota spent), in plain words.
    Also an `OSError`, so code that tolerates a failed write keeps doing so."""


class NotReady(OperatorError):
    """Something asked for before it exists (a run's adapter before training ends, a target not flagged yet)."""


_SERVER_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+~-]+){2,}/?")  # an absolute path of two or more parts


def without_server_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part ('…/worker.log'), for messages that
    leave the server: a bug's text or a job process's last log line names the virtualenv, the
    runs folder or Gradio's temporary folder, none of which the person at the browser should
    learn. Written by hand: no library scrubs paths out of free text."""
    return _SERVER_PATH.sub(lambda match: "…/" + match.group(0).rstrip("/").rsplit("/", 1)[-1], text)
