# Copyright (c) medcl contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Ignite handler that initialises part of a network from a pre-training checkpoint when the engine starts."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from medcl.networks.pretrained import DEFAULT_HOW_TO_MAKE, load_pretrained
from medcl.utils.checkpoints import require_checkpoint

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["PretrainedLoader"]

logger = logging.getLogger(__name__)


class PretrainedLoader:
    """
    Ignite handler that initialises ``network`` from a pre-training checkpoint with :func:`load_pretrained` when
    the engine starts (``Events.STARTED``, as MONAI's ``CheckpointLoader``), so a bundle's ``train#handlers``
    can list it. The file's existence is checked at construction, so a missing pre-training checkpoint fails
    when the config is instantiated, before data loading starts. The last report is kept in ``self.report``.

    Order with a resuming ``CheckpointLoader``: list this handler first, so that a resumed fine-tuning
    checkpoint overrides the pre-trained initialisation (handlers run in attachment order).

    Example (bundle ``train.json``)::

        {"_target_": "medcl.handlers.pretrained_loader.PretrainedLoader",
         "checkpoint_path": "@pretrained_ckpt", "network": "@network",
         "prefixes": "$medcl.networks.macl.pretrained_prefixes(@network)"}

    Args:
        checkpoint_path: the pre-training checkpoint.
        network: the network to initialise.
        prefixes: module-name prefixes to load (None: all keys).
        strict: see :func:`load_pretrained`. Defaults to True.
        name_map: checkpoint key renames, see :func:`load_pretrained`.
        key: checkpoint entry holding the state dict. Defaults to ``"model"``.
        map_location: passed to ``torch.load``. Defaults to ``"cpu"``.
        how_to_make: how to create the checkpoint, for the "not found" message.
        sha256: expected sha256 of the checkpoint (None: no check), see :func:`load_pretrained`.
        channel_mode: ``"average"`` or ``"repeat"``: pre-trained first-layer filters spread over another input-channel
            count (bundle key ``pretrained_channel_mode``), see :mod:`medcl.weights.adapt`.

    Raises:
        MedclInputError: at construction when the file does not exist.
    """

    def __init__(
        self,
        checkpoint_path: str | os.PathLike,
        network: nn.Module,
        prefixes: Sequence[str] | None = None,
        strict: bool = True,
        name_map: Mapping[str, str] | None = None,
        key: str | None = "model",
        map_location: str | torch.device = "cpu",
        how_to_make: str = DEFAULT_HOW_TO_MAKE,
        sha256: str | None = None,
        channel_mode: str = "average",
    ) -> None:
        self.checkpoint_path = require_checkpoint(
            os.fspath(checkpoint_path), how_to_make, "pre-trained checkpoint", "--pretrained_ckpt"
        )
        self.network = network
        self.prefixes = prefixes
        self.strict = strict
        self.name_map = name_map
        self.key = key
        self.map_location = map_location
        self.how_to_make = how_to_make
        self.sha256 = sha256
        self.channel_mode = channel_mode
        self.report: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Load at ``Events.STARTED`` of ``engine``."""
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> dict[str, Any]:
        """Load now; returns (and stores in ``self.report``) the :func:`load_pretrained` report."""
        self.report = load_pretrained(
            self.network,
            self.checkpoint_path,
            prefixes=self.prefixes,
            key=self.key,
            strict=self.strict,
            name_map=self.name_map,
            map_location=self.map_location,
            how_to_make=self.how_to_make,
            sha256=self.sha256,
            channel_mode=self.channel_mode,
        )
        log = engine.logger if engine is not None and getattr(engine, "logger", None) else logger
        log.info(
            "PretrainedLoader: %d tensors loaded from %s (%d adapted, %d skipped, %d missing, %d mismatched).",
            len(self.report["loaded"]),
            self.checkpoint_path,
            len(self.report["adapted"]),
            len(self.report["skipped"]) + len(self.report["fresh"]),
            len(self.report["missing"]),
            len(self.report["mismatched"]),
        )
        return self.report
