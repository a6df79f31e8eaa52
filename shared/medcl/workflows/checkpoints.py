"""Checkpoint paths a workflow needs before it starts."""

from __future__ import annotations

import os

from medcl.errors import MedclInputError

__all__ = ["require_checkpoint"]


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
