"""Errors medcl raises for problems the user can fix (bad data, bad configuration), and how a bundle run shows them."""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["MedclInputError", "find_input_error", "install_excepthook"]

TRACEBACK_ENV = "MEDCL_TRACEBACK"


class MedclInputError(ValueError):
    """A dataset, file or configuration value is unusable; the message names it and says how to fix it."""


def find_input_error(exc: BaseException | None) -> MedclInputError | None:
    """The :class:`MedclInputError` in ``exc``'s chain (``raise ... from``, or raised while handling), if any.

    MONAI's config parser wraps errors of config expressions in ``RuntimeError("Failed to evaluate ...")``; the
    user's problem is the error underneath.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedclInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    err = find_input_error(exc)
    if err is None or os.environ.get(TRACEBACK_ENV):
        sys.__excepthook__(kind, exc, tb)
        return
    sys.stderr.write(f"medcl.errors.MedclInputError: {err}\n(set {TRACEBACK_ENV}=1 for the full traceback)\n")


def install_excepthook() -> None:
    """In a command-line run, show a :class:`MedclInputError` as its one message instead of a traceback.

    A run that stops on bad input then prints one line naming the file or key and the fix (set ``MEDCL_TRACEBACK=1``
    to see the traceback); any other error keeps Python's usual traceback. Called by
    :func:`medcl.workflows.check_cli_overrides`, i.e. by every bundle config's ``initialize``.
    """
    sys.excepthook = _excepthook
