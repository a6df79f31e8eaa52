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
"""Stop (or skip) a training step whose loss is NaN or infinite, naming the iteration and the loss term."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import IgniteInfo, min_version, optional_import

from medcl.errors import MedclError

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard"]

logger = logging.getLogger(__name__)

_MODES = ("stop", "skip")


class NonFiniteLossError(MedclError, RuntimeError):
    """A loss term became NaN or infinite."""


def _terms(output: Any, loss_key: str) -> dict[str, torch.Tensor]:
    """The scalar loss terms of a trainer output: ``loss_key`` and every ``loss_*`` entry (PretrainTrainer steps)."""
    if not isinstance(output, Mapping):
        return {}
    return {
        k: v
        for k, v in output.items()
        if (k == loss_key or str(k).startswith("loss_")) and isinstance(v, torch.Tensor) and v.numel() == 1
    }


class NonFiniteLossGuard:
    """
    Check the loss terms of every iteration right after they are computed (``IterationEvents.LOSS_COMPLETED``,
    before backward and the optimizer step) of a MONAI ``SupervisedTrainer`` or
    :class:`medcl.engines.PretrainTrainer`.

    - ``mode="stop"`` (default): raise :class:`NonFiniteLossError` naming the iteration, epoch and each non-finite
      term (``loss_id``, ``loss_label``, ``loss_recon``, ``loss_local``, ...; the total is ``loss``), with the others'
      values. The weights are those of the last good step: MONAI's ``CheckpointSaver`` (``save_final``) saves them
      on the exception, and earlier checkpoints are kept.
    - ``mode="skip"``: log a warning and drop the step: the loss is replaced by a zero with no graph and, after
      backward, every gradient is set to None, so the optimizer leaves all parameters (and its moments) unchanged.
      After ``max_skips`` consecutive skips it stops as ``"stop"`` does. With AMP (a ``GradScaler``) the scaler
      already skips steps with non-finite gradients; the guard then only logs.

    Contrastive losses with small temperatures overflow in fp16 first; the message suggests what to change.

    Args:
        mode: ``"stop"`` or ``"skip"``.
        max_skips: consecutive skipped steps before stopping (``"skip"`` only). Defaults to 10.
        loss_key: key of the total loss in the trainer's output. Defaults to ``"loss"``.

    Raises:
        ValueError: for an unknown mode.
    """

    def __init__(self, mode: str = "stop", max_skips: int = 10, loss_key: str = "loss") -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        self.mode, self.max_skips, self.loss_key = mode, int(max_skips), loss_key
        self.skipped = 0  # consecutive
        self.total_skipped = 0
        self._drop_grads = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.check)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._after_backward)

    def check(self, engine: Engine) -> None:
        terms = _terms(engine.state.output, self.loss_key)
        bad = {k: float(v.detach()) for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())}
        if not bad:
            self.skipped = 0
            return
        where = f"iteration {engine.state.iteration} (epoch {engine.state.epoch})"
        good = {k: round(float(v.detach()), 6) for k, v in terms.items() if k not in bad}
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        hint = (
            "lower the learning rate or raise the contrastive temperature, train without AMP (--amp false), or "
            "check the inputs of this iteration"
        )
        self.skipped += 1
        self.total_skipped += 1
        if self.mode == "stop" or self.skipped > self.max_skips:
            why = "" if self.mode == "stop" else f" after {self.max_skips} skipped steps in a row"
            raise NonFiniteLossError(
                f"non-finite loss at {where}: {what} (other terms: {good}){why}. Training stopped; the weights are "
                f"those of the last finite step and earlier checkpoints are kept. To go on: {hint}; then add "
                "--resume true to continue from the last finished epoch, or --nonfinite_loss skip to drop such steps."
            )
        logger.warning(
            "non-finite loss at %s: %s (other terms: %s); step skipped (%d in a row).", where, what, good, self.skipped
        )
        if getattr(engine, "scaler", None) is not None and getattr(engine, "amp", False):
            return  # the GradScaler skips the step itself
        loss = engine.state.output[self.loss_key]
        engine.state.output[self.loss_key] = torch.zeros((), device=loss.device, requires_grad=True)
        self._drop_grads = True

    def _after_backward(self, engine: Engine) -> None:
        if self._drop_grads:
            for group in engine.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._drop_grads = False
