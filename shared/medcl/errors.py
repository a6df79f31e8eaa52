"""Errors medcl raises for problems the user can fix (bad data, bad configuration), and how a bundle run shows them."""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType

__all__ = ["MedclError", "MedclInputError", "find_medcl_error", "install_excepthook", "worker_message"]

TRACEBACK_ENV = "MEDCL_TRACEBACK"


class MedclError(Exception):
    """An error whose message says all the user needs (what, where, how to fix): a bundle run shows only it."""


class MedclInputError(MedclError, ValueError):
    """A dataset, file or configuration value is unusable; the message names it and says how to fix it."""


def find_medcl_error(exc: BaseException | None) -> MedclError | None:
    """The :class:`MedclError` (bad input, a diverged loss) in ``exc``'s chain (``raise ... from``, or raised while
    handling), if any.

    MONAI's config parser wraps errors of config expressions in ``RuntimeError("Failed to evaluate ...")``; the
    user's problem is the error underneath.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedclError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    err = find_medcl_error(exc)
    if err is None or os.environ.get(TRACEBACK_ENV):
        sys.__excepthook__(kind, exc, tb)
        return
    name = f"{type(err).__module__}.{type(err).__qualname__}"
    sys.stderr.write(f"{name}: {worker_message(str(err))}\n(set {TRACEBACK_ENV}=1 for the full traceback)\n")


def worker_message(text: str) -> str:
    """The error's own message from ``text``, which torch's ``DataLoader`` builds for an error raised in a loader
    worker ("Caught <Error> in DataLoader worker process 0. Original Traceback ...: <message>"); other text as is."""
    if "\nOriginal Traceback (most recent call last):" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    _, sep, message = last.partition(": ")
    return message if sep else text


def install_excepthook() -> None:
    """In a command-line run, show a :class:`MedclError` as its one message instead of a traceback.

    A run that stops on bad input or a diverged loss then prints one message naming the file, key or iteration and
    the fix (set ``MEDCL_TRACEBACK=1`` to see the traceback); any other error keeps Python's usual traceback. Called by
    :func:`medcl.bundle.check_cli_overrides`, i.e. by every bundle config's ``initialize``.

    Log records that quote a :class:`MedclError` raised in a data-loader worker (Ignite logs "... terminating due to
    exception: Caught MedclInputError in DataLoader worker process 0. Original Traceback ...") keep only its message
    too, unless ``MEDCL_TRACEBACK`` is set.
    """
    sys.excepthook = _excepthook
    if not os.environ.get(TRACEBACK_ENV) and not getattr(logging.getLogRecordFactory(), "_medcl", False):
        logging.setLogRecordFactory(_worker_message_records(logging.getLogRecordFactory()))


def _worker_message_records(factory):
    """A log-record factory that shortens a quoted loader-worker :class:`MedclError` to its message."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        if isinstance(record.msg, str) and (
            "Caught Medcl" in record.msg or any("Caught Medcl" in str(a) for a in record.args or ())
        ):
            text = record.getMessage()
            head, sep, _ = text.partition("Caught Medcl")
            if sep and "\nOriginal Traceback (most recent call last):" in text:
                record.msg, record.args = head + worker_message(text[len(head) :]), ()
        return record

    make._medcl = True
    return make
