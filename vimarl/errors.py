"""The one exception type users see: a one-line message that names the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VimarlError(Exception):
    """Bad input to vimarl. The CLI prints the message alone, without a traceback."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' hint for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> VimarlError:
    """The error for an unknown algorithm, environment or config key."""
    choices = sorted(choices)
    return VimarlError(
        f"unknown {kind} '{name}'{did_you_mean(name, choices)}; choose one of: {', '.join(choices)}"
    )


class TrainingInterrupted(VimarlError):
    """Training stopped by Ctrl-C or SIGTERM after writing a checkpoint."""


class NonFiniteError(VimarlError):
    """A loss, gradient norm, parameter, observation or reward became NaN or infinite."""
