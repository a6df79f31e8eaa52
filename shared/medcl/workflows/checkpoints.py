"""Checkpoints: paths a workflow needs before it starts, and loading downloaded weights safely (sha256, weights only)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader, CheckpointSaver

from medcl.errors import MedclInputError
from medcl.workflows.resume import register_run_state

__all__ = [
    "AtomicCheckpointSaver", "SafeCheckpointLoader", "compare_state_dicts", "expected_sha256", "file_sha256",
    "require_checkpoint", "verify_sha256",
]

LARGE_FILES = ("large_files.yml", "large_files.yaml", "large_files.json")


def require_checkpoint(
    path: str, how_to_make: str = "run the bundle's train.json first", what: str = "checkpoint", override: str = "--ckpt_dir"
) -> str:
    """Return ``path`` if the checkpoint exists, else raise an error that says how to create it.

    Args:
        path: checkpoint file.
        how_to_make: the command or step that creates it.
        what: what the file is, for the message (e.g. ``"pre-trained checkpoint"``).
        override: the config override that points elsewhere.

    Raises:
        MedclInputError: when ``path`` is not a file.
    """
    if not os.path.isfile(path):
        raise MedclInputError(f"{path}: {what} not found. To create it, {how_to_make} (or pass {override}).")
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None) -> None:
    """Check ``path`` against an expected sha256 (nothing to check when ``expected`` is None or empty).

    Raises:
        MedclInputError: when the file's sha256 differs (tampered, truncated or another file).
    """
    if not expected:
        return
    actual = file_sha256(path)
    if actual.lower() != str(expected).lower():
        raise MedclInputError(
            f"{os.fspath(path)}: sha256 {actual} does not match the expected {expected}: the file is not the one the "
            "bundle was published with (tampered, truncated or replaced). It was not loaded; download the bundle again "
            "from a source you trust."
        )


def expected_sha256(bundle_root: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """The sha256 that ``<bundle_root>/large_files.yml`` (or ``.yaml``/``.json``) records for ``path``, if any.

    ``path`` may be absolute or relative to ``bundle_root``; entries are ``{"path", "url", "hash_val", "hash_type"}``
    as MONAI's ``download_large_files`` reads them. None when there is no such file, no entry for ``path`` or the
    entry's hash is not a sha256.
    """
    root = os.path.abspath(os.fspath(bundle_root))
    target = os.path.normpath(os.path.join(root, os.fspath(path)))
    for name in LARGE_FILES:
        listing = os.path.join(root, name)
        if not os.path.isfile(listing):
            continue
        entries = ConfigParser.load_config_file(listing).get("large_files", [])
        for entry in entries:
            if os.path.normpath(os.path.join(root, entry.get("path", ""))) == target:
                if str(entry.get("hash_type", "")).lower() == "sha256" and entry.get("hash_val"):
                    return str(entry["hash_val"])
                return None
    return None


def compare_state_dicts(ckpt: Mapping[str, Any], net_sd: Mapping[str, Any]) -> dict[str, Any]:
    """How a checkpoint's state dict fits a network's.

    Returns:
        ``{"fits": {key: value} (in the network, same shape), "unexpected": [checkpoint keys not in the network],
        "missing": [network keys not in the checkpoint], "mismatched": [(key, checkpoint shape, network shape)]}``;
        lists in checkpoint order, ``missing`` in network order.
    """
    fits, unexpected, mismatched = {}, [], []
    for key, value in ckpt.items():
        if key not in net_sd:
            unexpected.append(key)
            continue
        have, want = tuple(getattr(value, "shape", ())), tuple(getattr(net_sd[key], "shape", ()))
        if have != want:
            mismatched.append((key, have, want))
        else:
            fits[key] = value
    missing = [k for k in net_sd if k not in ckpt]
    return {"fits": fits, "unexpected": unexpected, "missing": missing, "mismatched": mismatched}


class SafeCheckpointLoader(CheckpointLoader):
    """
    MONAI's :class:`~monai.handlers.CheckpointLoader` for weights that came from elsewhere: before anything is
    read, the file must exist (message naming it) and, when ``sha256`` is given, match it; then it is read with
    ``torch.load(..., weights_only=True)`` (what MONAI's loader does), so a file carrying pickled code is refused
    with one clear error and nothing in it runs.

    Args:
        load_path: the checkpoint.
        load_dict: objects to load into, as :class:`~monai.handlers.CheckpointLoader`.
        sha256: expected sha256 of the file (e.g. :func:`expected_sha256` from the bundle's ``large_files.yml``);
            None: no check.
        kwargs: other :class:`~monai.handlers.CheckpointLoader` arguments (``map_location``, ``strict``, ...).

    Raises:
        MedclInputError: (when the engine starts) for a missing file, a sha256 mismatch, a file that is not a
            plain weights file, or weights of another network (keys or shapes differ; one message naming the file
            and the first differing keys, instead of ``load_state_dict``'s full key lists).
    """

    def __init__(self, load_path: str, load_dict: Mapping[str, Any], sha256: str | None = None, **kwargs: Any) -> None:
        super().__init__(load_path=load_path, load_dict=dict(load_dict), **kwargs)
        self.sha256 = sha256

    def __call__(self, engine: Any) -> None:
        path = require_checkpoint(self.load_path, "train the bundle first (train.json) or download it", "checkpoint",
                                  "--ckpt_path")
        verify_sha256(path, self.sha256)
        try:  # memory-mapped, so checking costs no second read of the weights
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise MedclInputError(
                f"{path}: not a readable plain weights file — torch.load(weights_only=True) refused it "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Nothing in it was executed; a "
                "truncated download or a file carrying pickled code gives this. Only load checkpoints from sources "
                "you trust."
            ) from e
        self._check_fits(path, obj)
        super().__call__(engine)

    def _check_fits(self, path: str, obj: Any) -> None:
        """Refuse, with one short message, weights that ``load_state_dict`` would reject with a long key list.

        Raises:
            MedclInputError: when a network of ``load_dict`` lacks keys of the checkpoint or has keys it lacks
                (``strict``), or a tensor's shape differs (``strict_shape``); names the file and the first keys.
        """
        if not isinstance(obj, Mapping) or not self.load_dict:
            return
        first = next(iter(self.load_dict))
        ckpt = {first: obj} if len(self.load_dict) == 1 and first not in obj else obj
        for name, target in self.load_dict.items():
            if isinstance(target, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
                target = target.module
            if not isinstance(target, torch.nn.Module) or not isinstance(ckpt.get(name), Mapping):
                continue
            fit = compare_state_dicts(ckpt[name], target.state_dict())
            found = {
                "keys missing from the checkpoint": fit["missing"] if self.strict else [],
                "keys not in the network": fit["unexpected"] if self.strict else [],
                "shape mismatches": [f"{k}: checkpoint {c} vs network {n}" for k, c, n in fit["mismatched"]]
                if self.strict_shape else [],
            }
            problems = [
                f"{len(v)} {what} ({'; '.join(v[:3])}{' ...' if len(v) > 3 else ''})" for what, v in found.items() if v
            ]
            if problems:
                raise MedclInputError(
                    f"{path}: the checkpoint does not fit {type(target).__name__}: {'; '.join(problems)}. It was saved "
                    "from another network or configuration: pass --ckpt_path to a model.pt this bundle wrote, and the "
                    "same network overrides (spatial_dims, patch_size, network sizes) as its training run."
                )


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
        self.inner(checkpoint, filename, metadata)
        if getattr(self.inner, "filename", None) is None:  # a fixed name (MONAI's model.pt) was just replaced in place
            for old in self.pending:
                if old != filename:
                    self.inner.remove(old)
        self.pending = []

    def remove(self, filename: str) -> None:
        self.pending.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """
    MONAI's :class:`~monai.handlers.CheckpointSaver` with crash-safe saving: every checkpoint is written to a
    temporary file in the same folder and renamed over the target (Ignite's ``DiskSaver(atomic=True)``, which MONAI
    turns off), and a checkpoint being replaced (``n_saved``, a new best ``model.pt``) is removed only after its
    successor is in place. A run killed while saving therefore keeps the previous checkpoint intact and never leaves
    a truncated one; at worst a ``tmp*`` file remains in the folder. Files get the usual permissions (group and others
    may read).

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
        if not self._trained:
            raise e
        super().exception_raised(engine, e)

    def _checkpoints(self) -> dict[str, Any]:
        return {k: v for k, v in (("final", self._final_checkpoint), ("key_metric", self._key_metric_checkpoint),
                                  ("interval", self._interval_checkpoint)) if v is not None}

    def state_dict(self) -> dict[str, Any]:
        """The saved-file lists (with their scores) of every checkpoint kind, for resuming a run."""
        return {k: v.state_dict() for k, v in self._checkpoints().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: e.g. a resumed run replaces ``model.pt`` only with a better one."""
        for k, ckpt in self._checkpoints().items():
            if k in state_dict:
                ckpt.load_state_dict(state_dict[k])
