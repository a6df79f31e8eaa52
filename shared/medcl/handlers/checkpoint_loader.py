"""Loading weights that came from elsewhere: sha256 and weights-only checks before MONAI's CheckpointLoader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.handlers import CheckpointLoader

from medcl.errors import MedclInputError
from medcl.utils.checkpoints import compare_state_dicts, require_checkpoint, verify_sha256
from medcl.weights.manifest import verify_manifest

__all__ = ["SafeCheckpointLoader"]


class SafeCheckpointLoader(CheckpointLoader):
    """
    MONAI's :class:`~monai.handlers.CheckpointLoader` for weights that came from elsewhere: before anything is
    read, the file must exist (message naming it) and, when ``sha256`` is given, match it (and the sha256 in its
    ``<file>.manifest.json``, :func:`medcl.weights.verify_manifest`, when it has one); then it is read with
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
        path = require_checkpoint(
            self.load_path, "train the bundle first (train.json) or download it", "checkpoint", "--ckpt_path"
        )
        verify_sha256(path, self.sha256)
        verify_manifest(path)  # <file>.manifest.json, when medcl wrote one: its sha256 must match too
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
                if self.strict_shape
                else [],
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
