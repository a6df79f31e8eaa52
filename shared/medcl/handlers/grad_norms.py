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
"""Per-term gradient norms on the shared parameters, once per epoch: shows a dead or a dominating loss term."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from monai.engines.utils import IterationEvents
from monai.utils import IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["TermGradNormHandler"]

logger = logging.getLogger(__name__)


class TermGradNormHandler:
    """
    Logs ``grad_norm_<term> = || d(w_term * L_term) / d theta ||_2`` for every loss term of a step-based trainer
    (:class:`~medcl.engines.pretrain_trainer.PretrainTrainer`), on the parameters ``theta`` that the terms share.

    On the first iteration of every ``interval``-th epoch, right after the step has returned its terms
    (``IterationEvents.LOSS_COMPLETED``, the graph still alive), each term ``loss_<name>`` that carries a graph is
    differentiated alone with ``torch.autograd.grad`` (the graph is retained for the iteration's own backward, which
    is unchanged). ``w_term`` is the weight the step gives the term in its total (the step's ``term_weights``
    mapping when it has one, else 1), so the norms compare what each term contributes to the update. ``theta``:
    the parameters under ``param_prefixes`` (names as in ``network.named_parameters()``, a DDP ``module.`` prefix
    ignored), or by default the *shared* parameters, those every term reaches (for MixCL the ViT blocks and
    encoder branch feeding the label layer, which L_id, L_label and L_recon all train).

    The norms go to ``engine.state.metrics`` (``grad_norm_id``, ``grad_norm_label``, ...), where MONAI's
    ``StatsHandler`` prints them and ``MLFlowHandler`` logs them at the end of the epoch, and to this module's
    logger with the seconds they took. Cost: one extra backward pass per term, once per epoch (measured by
    ``scripts/bench_grad_norms.py``). Not computed under torchrun with more than one process
    (``DistributedDataParallel`` expects one backward per forward). Under AMP the norms are of the unscaled
    autocast gradients.

    Args:
        interval: epochs between measurements (1: every epoch). 0 switches the handler off.
        param_prefixes: parameter-name prefixes to measure on; None: the parameters every term reaches.
        loss_key: key of the step's total, which is not a term. Defaults to ``"loss"``.
        term_prefix: prefix of the term keys; the metric is ``grad_norm_`` + the key without it. Defaults to
            ``"loss_"``.

    Raises:
        ValueError: when ``interval`` is negative.
    """

    def __init__(
        self,
        interval: int = 1,
        param_prefixes: Sequence[str] | None = None,
        loss_key: str = "loss",
        term_prefix: str = "loss_",
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 (0: off), got {interval}.")
        self.interval = int(interval)
        self.param_prefixes = None if param_prefixes is None else [str(p) for p in param_prefixes]
        self.loss_key = loss_key
        self.term_prefix = term_prefix
        self.last: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s ``IterationEvents.LOSS_COMPLETED``."""
        if self.interval > 0:
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def _due(self, engine: Engine) -> bool:
        state = engine.state
        first_of_epoch = (state.iteration - 1) % max(1, state.epoch_length or 1) == 0
        return first_of_epoch and state.epoch % self.interval == 0

    def _parameters(self, network: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(n.removeprefix("module."), p) for n, p in network.named_parameters() if p.requires_grad]
        if self.param_prefixes is None:
            return named
        return [(n, p) for n, p in named if any(n.startswith(pre) for pre in self.param_prefixes)]

    def compute(
        self, network: torch.nn.Module, terms: Mapping[str, Any], weights: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """
        Gradient norm of each weighted term on the measured parameters.

        Args:
            network: the trained module.
            terms: the step's output (``{"loss": total, "loss_<name>": 0-dim tensor, ...}``).
            weights: weight of each term key in the total (missing: 1).

        Returns:
            ``{"grad_norm_<name>": float}`` for each term with a graph; empty when no parameter is shared.
        """
        named = self._parameters(network)
        keys = [
            k
            for k, v in terms.items()
            if k != self.loss_key
            and k.startswith(self.term_prefix)
            and isinstance(v, torch.Tensor)
            and v.requires_grad
            and v.numel() == 1
        ]
        params = [p for _, p in named]
        grads = {}
        for k in keys:
            w = float((weights or {}).get(k, 1.0))
            g = torch.autograd.grad(terms[k].reshape(()) * w, params, retain_graph=True, allow_unused=True)
            grads[k] = g
        if not grads:
            return {}
        if self.param_prefixes is None:  # the parameters every term reaches
            shared = [i for i in range(len(params)) if all(g[i] is not None for g in grads.values())]
        else:
            shared = list(range(len(params)))
        if not shared:
            return {}
        out = {}
        for k, g in grads.items():
            sq = [g[i].detach().float().pow(2).sum() for i in shared if g[i] is not None]
            out["grad_norm_" + k.removeprefix(self.term_prefix)] = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
        return out

    def __call__(self, engine: Engine) -> None:
        if not self._due(engine):
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return
        output = engine.state.output
        if not isinstance(output, Mapping):
            return
        t0 = time.perf_counter()
        weights = getattr(engine.loss_function, "term_weights", None)
        norms = self.compute(engine.network, output, weights)
        seconds = time.perf_counter() - t0
        if not norms:
            return
        self.last = norms
        engine.state.metrics.update(norms)
        logger.info(
            "epoch %d gradient norms on the shared parameters: %s (%.2f s)",
            engine.state.epoch,
            ", ".join(f"{k} {v:.4g}" for k, v in norms.items()),
            seconds,
        )
