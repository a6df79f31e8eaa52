"""Crash-safe checkpoint saving: atomic writes, and a replaced checkpoint removed only after its successor exists."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from medcl.handlers.run_state import register_run_state
from medcl.utils.atomic import DiskFullError, disk_full_error
from medcl.weights.manifest import MANIFEST_SUFFIX, write_manifest

__all__ = ["AtomicCheckpointSaver"]

logger = logging.getLogger(__name__)


def _weights_of(checkpoint: Mapping) -> Mapping:
    """The network's state dict in what Ignite saves: the dict itself (one ``save_dict`` entry) or its ``"model"``."""
    inner = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    return inner if isinstance(inner, Mapping) else checkpoint


class _SaveThenRemove(BaseSaveHandler):
    """Wraps a ``DiskSaver``: atomic writes, and old checkpoints removed only after the new one is in place.

    Ignite's ``Checkpoint`` removes the file it replaces *before* writing the new one (and with MONAI's fixed file
    names, e.g. ``model.pt``, it removes the very file it is about to rewrite), so a kill in between would leave no
    checkpoint at all. Here removals wait until the next write has been renamed into place; a removal of the file
    just written is dropped.
    """

    def __init__(self, inner: Any, manifest: Callable[[], Mapping] | None = None) -> None:
        self.inner = inner
        self.inner._atomic = True
        self.pending: list[str] = []
        self.manifest = manifest

    @property
    def dirname(self):  # what Ignite reads of a DiskSaver (e.g. Checkpoint.last_checkpoint)
        return self.inner.dirname

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        folder = Path(self.inner.dirname)
        before = set(folder.glob("tmp*"))
        target = getattr(self.inner, "filename", None) or filename  # MONAI's saver writes its fixed name (model.pt)
        # the old manifest goes first: a kill before the new one is written leaves weights without a manifest (they
        # load, unchecked), never beside a stale one (refused as a sha256 mismatch)
        (folder / (target + MANIFEST_SUFFIX)).unlink(missing_ok=True)
        try:
            self.inner(checkpoint, filename, metadata)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            for tmp in set(folder.glob("tmp*")) - before:  # Ignite leaves its temporary file if closing it fails
                tmp.unlink(missing_ok=True)
            raise disk_full_error(str(folder / filename), _size(folder / filename)) from e
        if self.manifest is not None:
            self._write_manifest(folder / target, checkpoint)
        if getattr(self.inner, "filename", None) is None:  # a fixed name (MONAI's model.pt) was just replaced in place
            for old in self.pending:
                if old != filename:
                    self.inner.remove(old)
                    (folder / (old + MANIFEST_SUFFIX)).unlink(missing_ok=True)
        self.pending = []

    def _write_manifest(self, path: Path, checkpoint: Mapping) -> None:
        """``<path>.manifest.json`` (:mod:`medcl.weights.manifest`); a failure other than a full disk is logged and
        the run goes on (the weights are saved; they load without a manifest)."""
        try:
            write_manifest(path, _weights_of(checkpoint), self.manifest())
        except DiskFullError:
            raise
        except Exception as e:
            logger.warning("%s: the weights are saved but their manifest could not be written: %s", path, e)

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
    not fit, ...) leaves the files of an earlier run as they are.

    With ``manifest``, every file saved gets a ``<file>.manifest.json`` beside it (:mod:`medcl.weights.manifest`:
    network class and arguments, spatial dims, in/out channels, pre-trained parts, loss, data, versions, sha256),
    written after the weights are in place and removed with them.

    Args:
        args, kwargs: as :class:`~monai.handlers.CheckpointSaver`.
        manifest: fields for the manifest (e.g. ``{"role": "pretrained", "network": <the network>, "network_config":
            "network_def", "pretrained_parts": [...], "loss": ..., "dataset": {...}}``; ``network`` may be the module,
            its class and the arguments of the bundle config's ``network_config`` key are recorded). None: no manifest.
    """

    def __init__(self, *args: Any, manifest: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._manifest_fields = None if manifest is None else dict(manifest)
        self._manifest_cache: dict[str, Any] | None = None
        writer = None if manifest is None else self._manifest
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _SaveThenRemove(ckpt.save_handler, writer)
        self._trained = False

    def _manifest(self) -> dict[str, Any]:
        """The configured manifest fields, the network resolved once to its class and config arguments."""
        if self._manifest_cache is None:
            from medcl.weights.manifest import network_spec

            fields = dict(self._manifest_fields or {})
            config_id = fields.pop("network_config", "network_def")
            network = fields.get("network")
            if network is None or isinstance(network, torch.nn.Module):
                fields["network"] = network_spec(network, config_id)
            self._manifest_cache = fields
        return self._manifest_cache

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
