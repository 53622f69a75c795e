"""Exceptions raised by refcond.

Every error says what was wrong, where (file, key, plugin, field) and how to fix it. All of them
derive from :class:`RefcondError`, so ``except refcond.RefcondError`` catches any bad input.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RefcondError(Exception):
    """Base class of every error refcond raises on bad input."""


class UnknownComponentError(RefcondError, KeyError):
    """A component, composition or checkpoint format name that no plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str], hint: str = ""):
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        message = f"unknown {kind} {name!r}."
        close = difflib.get_close_matches(name, self.available, n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
        listed = ", ".join(repr(n) for n in self.available) or "none"
        message += f" Available {kind}s: {listed}. Run `refcond plugins` to see which plugin provides each."
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0])


class DuplicateComponentError(RefcondError):
    """Two plugins registered the same name for the same kind of component.

    ``first`` and ``second`` are the provenances (plugin, distribution, version) of the two entries.
    """

    def __init__(self, kind: str, name: str, first: object, second: object):
        self.kind = kind
        self.name = name
        self.first = first
        self.second = second
        super().__init__(
            f"{kind} {name!r} is registered twice: by {first} and by {second}. Uninstall one of them, "
            "or restrict loading with REFCOND_LOAD_PLUGINS=name1,name2."
        )


class PluginError(RefcondError):
    """A plugin failed to import or to register its components."""


class ConfigError(RefcondError, ValueError):
    """A composition or component configuration is invalid."""


class CheckpointError(RefcondError, ValueError):
    """A checkpoint file is missing, unreadable, unsafe, or does not match the model."""


class ReferenceImageError(RefcondError, ValueError):
    """A reference image is missing, unreadable or of an unsupported kind."""


class OutputError(RefcondError, OSError):
    """A file could not be written (an unwritable folder, a full disk); the old file, if any, is intact."""


class IncompatibleBackboneError(RefcondError, ValueError):
    """A component or checkpoint was made for another backbone than the one it is attached to."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return `` Did you mean 'x'?`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
