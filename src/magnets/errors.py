"""Errors that a user fixes (a config value, a missing dataset, a mismatched file), not bugs.

Entry points (``magnets.cli.run_entry``) turn these into one line naming
what is wrong and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """Base class: the message alone tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A config value is invalid: names the key, the value and the valid ones."""

    def __init__(self, key: str, value: Any, valid: Iterable[Any] | str) -> None:
        valid_text = valid if isinstance(valid, str) else ", ".join(map(str, valid))
        super().__init__(f"{key}={value!r} is not valid; valid: {valid_text}")
        self.key, self.value = key, value


class MissingFileError(UserError, FileNotFoundError):
    """A file the config names (a checkpoint, weights) does not exist."""


class DataNotFoundError(MissingFileError):
    """A dataset is not where the config says: the message names the folder and how to get the data."""


class MismatchError(UserError, ValueError):
    """A file (checkpoint, token shard) is unreadable or was made under other settings than the config asks for."""


def load_error_summary(err: BaseException) -> str:
    """One line of why ``torch.load`` refused a file, without torch's advice to retry with ``weights_only=False``
    (running a file's code is never the fix for a file that is not a weights file): the ``WeightsUnpickler`` reason
    when there is one, else the first line of the message, with the exception's type."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = " ".join(text.split(marker, 1)[1].split("Check the documentation", 1)[0].split())
        return f"not a plain tensor file ({reason or 'unsupported content'})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
