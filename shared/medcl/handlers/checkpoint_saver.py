"""Crash-safe checkpoint saving: atomic writes, and a replaced checkpoint removed only after its successor exists."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from medcl.handlers.run_state import register_run_state
from medcl.utils.atomic import DiskFullError, disk_full_error

__all__ = ["AtomicCheckpointSaver"]


class _SaveThenRemove(BaseSaveHandler):
    """Wraps a ``DiskSaver``: atomic writes, and old checkpoints removed only after the new one is in place.

    Ignite's ``Checkpoint`` removes the file it replaces *before* writing the new one (and with MONAI's fixed file
    names, e.g. ``model.pt``, it removes the very file it is about to rewrite), so a kill in between would leave no
    checkpoint at all. Here removals wait until the next write has been renamed into place; a removal of the file
    just written is dropped.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.inner._atomic = True
        self.pending: list[str] = []

    @property
    def dirname(self):  # what Ignite reads of a DiskSaver (e.g. Checkpoint.last_checkpoint)
        return self.inner.dirname

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        folder = Path(self.inner.dirname)
        before = set(folder.glob("tmp*"))
        try:
            self.inner(checkpoint, filename, metadata)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            for tmp in set(folder.glob("tmp*")) - before:  # Ignite leaves its temporary file if closing it fails
                tmp.unlink(missing_ok=True)
            raise disk_full_error(str(folder / filename), _size(folder / filename)) from e
        if getattr(self.inner, "filename", None) is None:  # a fixed name (MONAI's model.pt) was just replaced in place
            for old in self.pending:
                if old != filename:
                    self.inner.remove(old)
        self.pending = []

    def remove(self, filename: str) -> None:
        self.pending.append(filename)


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


class AtomicCheckpointSaver(CheckpointSaver):
    """
    MONAI's :class:`~monai.handlers.CheckpointSaver` with crash-safe saving: every checkpoint is written to a
    temporary file in the same folder and renamed over the target (Ignite's ``DiskSaver(atomic=True)``, which MONAI
    turns off), and a checkpoint being replaced (``n_saved``, a new best ``model.pt``) is removed only after its
    successor is in place. A run killed while saving therefore keeps the previous checkpoint intact and never leaves
    a truncated one; at worst a ``tmp*`` file remains in the folder. A full disk stops the run with one message
    (:class:`~medcl.utils.atomic.DiskFullError`: the folder, the free and the needed space), the temporary file
    removed and no final checkpoint attempted. Files get the usual permissions (group and others may read).

    With ``save_final``, an exception (a non-finite loss, Ctrl-C) saves the final checkpoint only when the run has
    trained at least one iteration since it started: an error before training (a pre-trained or run state that does
    not fit, ...) leaves the files of an earlier run as they are. Arguments as :class:`~monai.handlers.CheckpointSaver`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _SaveThenRemove(ckpt.save_handler)
        self._trained = False

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        register_run_state(engine, "checkpoint_saver", self)  # its saved-file lists travel with a resumed run
        if self._final_checkpoint is not None:
            engine.add_event_handler(Events.STARTED, lambda _: setattr(self, "_trained", False))
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: setattr(self, "_trained", True))

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if not self._trained or isinstance(e, DiskFullError):  # no final save on a full disk: keep what is there
            raise e
        super().exception_raised(engine, e)

    def _checkpoints(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("final", self._final_checkpoint),
                ("key_metric", self._key_metric_checkpoint),
                ("interval", self._interval_checkpoint),
            )
            if v is not None
        }

    def state_dict(self) -> dict[str, Any]:
        """The saved-file lists (with their scores) of every checkpoint kind, for resuming a run."""
        return {k: v.state_dict() for k, v in self._checkpoints().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: e.g. a resumed run replaces ``model.pt`` only with a better one."""
        for k, ckpt in self._checkpoints().items():
            if k in state_dict:
                ckpt.load_state_dict(state_dict[k])
