"""Checkpoint paths a workflow needs before it starts."""

from __future__ import annotations

import os

from medcl.errors import MedclInputError

__all__ = ["require_checkpoint"]


def require_checkpoint(path: str, how_to_make: str = "run the bundle's train.json first") -> str:
    """Return ``path`` if the checkpoint exists, else raise an error that says how to create it.

    Raises:
        MedclInputError: when ``path`` is not a file.
    """
    if not os.path.isfile(path):
        raise MedclInputError(f"{path}: checkpoint not found. To create it, {how_to_make} (or pass --ckpt_dir).")
    return path
