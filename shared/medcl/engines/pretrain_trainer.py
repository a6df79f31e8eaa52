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
"""
A pre-training engine: MONAI's :class:`~monai.engines.SupervisedTrainer` with an iteration that hands the whole
batch to a *step* object returning named loss terms.

Self-supervised and semi-supervised methods do not fit ``loss(network(image), label)``: MACL makes four views and
runs two network branches, MixCL mixes labelled and unlabelled batches. Here the method lives in a step,
``step(network, batch) -> {"loss": total, "loss_a": ..., "loss_b": ...}``, and the engine does the rest exactly as
``SupervisedTrainer._iteration`` does (device transfer, ``network.train()``, autocast, backward, gradient
accumulation, optimizer step, the iteration events), so every MONAI/Ignite handler works unchanged:
``CheckpointSaver``, ``LrScheduleHandler``, ``StatsHandler``, ``ValidationHandler``, ``MLFlowHandler``
(``monai.bundle run ... --tracking mlflow``), ignite metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = ["PretrainTrainer", "prepare_dict_batch", "PretrainStep"]

#: A step: ``step(network, batch) -> {"loss": total (0-dim tensor), "<term>": 0-dim tensor, ...}``.
PretrainStep = Callable[[nn.Module, Mapping[str, Any]], Mapping[str, torch.Tensor]]


def prepare_dict_batch(
    batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """
    Default ``prepare_batch`` of :class:`PretrainTrainer`: the collated dict with every tensor moved to ``device``.

    ``MetaTensor`` values become plain tensors (``as_tensor()``): the step gets no metadata, and the network runs
    without MetaTensor's per-operation overhead. Nested dict batches (e.g. ``{"labelled": {...}, "unlabelled":
    {...}}`` from :class:`medcl.data.MixedLoader`) are handled the same way, level by level. Other non-tensor values
    (file names, metadata dicts of a collated batch) are kept as they are.

    Args:
        batchdata: a collated batch, ``{key: value}``.
        device: target device.
        non_blocking: passed to ``Tensor.to``.
        kwargs: other ``Tensor.to`` arguments (the trainer's ``to_kwargs``, e.g. ``memory_format``).

    Raises:
        TypeError: when ``batchdata`` is not a mapping.
    """
    if not isinstance(batchdata, Mapping):
        raise TypeError(f"PretrainTrainer expects dict batches (key -> tensor), got {type(batchdata).__name__}.")
    out: dict[str, Any] = {}
    for key, value in batchdata.items():
        if isinstance(value, torch.Tensor):
            if isinstance(value, MetaTensor):
                value = value.as_tensor()
            value = value.to(device=device, non_blocking=non_blocking, **kwargs)
        elif isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values()):
            value = prepare_dict_batch(value, device, non_blocking, **kwargs)
        out[key] = value
    return out


def _scalar(value: Any) -> Any:
    """A detached Python number for a one-element tensor (as MONAI's decollation gives), else the value detached."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.item() if value.numel() == 1 else value
    return value


class PretrainTrainer(SupervisedTrainer):
    """
    Trainer whose iteration is ``terms = step(network, batch)``; backpropagates ``terms["loss"]``.

    One iteration, mirroring :meth:`monai.engines.SupervisedTrainer._iteration`:

    1. ``batch = prepare_batch(batchdata, device, non_blocking, **to_kwargs)`` (default: :func:`prepare_dict_batch`);
    2. ``network.train()``, ``optimizer.zero_grad()`` (respecting ``accumulation_steps``);
    3. under ``torch.autocast("cuda")`` when ``amp``: ``terms = loss_function(network, batch)``, then the events
       ``FORWARD_COMPLETED`` and ``LOSS_COMPLETED`` (the step does forward and loss together);
    4. backward of ``terms["loss"]`` (scaled by the ``GradScaler`` with ``amp``, divided by ``accumulation_steps``),
       ``BACKWARD_COMPLETED``, optimizer step, ``MODEL_COMPLETED``.

    ``engine.state.output`` holds the step's terms: during the iteration a dict of tensors (the total still attached
    to the graph, for ``LOSS_COMPLETED``/``BACKWARD_COMPLETED`` handlers); after ``MODEL_COMPLETED``, with
    ``decollate=True`` (default), ``[{"loss": float, "<term>": float, ...}]``, the form of a decollated MONAI trainer
    output: StatsHandler's and MLFlowHandler's default ``output_transform`` (``lambda x: x[0]``) then print / log every
    term, and ``monai.handlers.from_engine(["loss"], first=True)`` (what ``--tracking mlflow`` uses) gives the total.
    Per-term epoch averages: ``additional_metrics={"loss_g": ignite.metrics.Average(output_transform=
    from_engine(["loss_g"], first=True)), ...}`` with a ``key_train_metric`` (MONAI only registers metrics when one is
    given); they land in ``engine.state.metrics``, printed by StatsHandler and logged by MLFlowHandler each epoch.
    With ``decollate=False`` the step's dict of tensors is kept as returned.

    The step is any callable ``step(network, batch) -> Mapping[str, Tensor]`` with the total under ``loss_key``;
    it calls ``network`` (possibly wrapped in ``DistributedDataParallel``: call it once per iteration, see
    :class:`medcl.engines.macl_step.MACLViewsModel`) and must not call ``backward`` or the optimizer.

    Args:
        device: device to run on.
        max_epochs: number of epochs.
        train_data_loader: iterable of dict batches.
        network: the module trained (its parameters are in ``optimizer``); passed to the step.
        optimizer: the optimizer.
        loss_function: the step, ``step(network, batch) -> {"loss": total, ...}``.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        non_blocking: non-blocking device transfer.
        prepare_batch: ``prepare_batch(batchdata, device, non_blocking, **to_kwargs) -> batch`` given to the step.
            Defaults to :func:`prepare_dict_batch`.
        iteration_update: replaces :meth:`_iteration` entirely (ignite's ``process_function``).
        postprocessing: transforms run on ``engine.state.batch`` / ``engine.state.output`` after each iteration.
        key_train_metric, additional_metrics, metric_cmp_fn: as :class:`~monai.engines.SupervisedTrainer`.
        train_handlers: handlers with an ``attach`` method (``CheckpointSaver``, ``StatsHandler``, ...).
        amp: mixed precision on CUDA (``torch.autocast("cuda")`` and a ``GradScaler``).
        event_names, event_to_attr: extra ignite events, see :class:`~monai.engines.SupervisedTrainer`.
        decollate: turn the output into ``[{term: float}]`` after each iteration (see above). Defaults to True.
        optim_set_to_none: ``optimizer.zero_grad(set_to_none=...)``.
        to_kwargs: extra ``Tensor.to`` arguments for ``prepare_batch``.
        amp_kwargs: ``torch.autocast`` arguments.
        compile, compile_kwargs: ``torch.compile`` the network (note: forward hooks that stop a pass early, as
            :class:`~medcl.networks.feature_taps.FeatureTaps` does, may not compile).
        accumulation_steps: gradient accumulation, as :class:`~monai.engines.SupervisedTrainer`.
        loss_key: key of the total in the step's output. Defaults to ``"loss"``.

    Raises:
        TypeError: (during a run) when the step does not return a mapping.
        KeyError: (during a run) when the step's output lacks ``loss_key``.
        ValueError: (during a run) when the total is not a scalar tensor.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: PretrainStep,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_dict_batch,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        accumulation_steps: int = 1,
        loss_key: str = Keys.LOSS,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            inferer=None,
            postprocessing=postprocessing,
            key_train_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            train_handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            optim_set_to_none=optim_set_to_none,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            compile=compile,
            compile_kwargs=compile_kwargs,
            accumulation_steps=accumulation_steps,
        )
        self.loss_key = loss_key

    def _register_decollate(self) -> None:
        """After ``MODEL_COMPLETED``: ``{term: tensor}`` -> ``[{term: float}]`` (a decollated trainer output)."""

        @self.on(IterationEvents.MODEL_COMPLETED)
        def _decollate_output(engine: Engine) -> None:
            if isinstance(engine.state.output, Mapping):
                engine.state.output = [{k: _scalar(v) for k, v in engine.state.output.items()}]

    def _check_terms(self, terms: Any) -> dict[str, Any]:
        if not isinstance(terms, Mapping):
            raise TypeError(
                f"the step {type(self.loss_function).__name__} must return a dict of loss terms, got {type(terms)}."
            )
        if self.loss_key not in terms:
            raise KeyError(f"the step's output has no total {self.loss_key!r} (terms: {sorted(terms)}).")
        total = terms[self.loss_key]
        if not isinstance(total, torch.Tensor) or total.numel() != 1:
            shape = tuple(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__
            raise ValueError(f"the total {self.loss_key!r} must be a one-element tensor, got {shape}.")
        out = dict(terms)
        out[self.loss_key] = total.reshape(())
        return out

    def _accumulation_state(self, engine: PretrainTrainer) -> tuple[bool, bool]:
        """``(zero the gradients now, step the optimizer now)`` for gradient accumulation, as SupervisedTrainer."""
        acc = engine.accumulation_steps
        if acc <= 1:
            return True, True
        epoch_length = engine.state.epoch_length
        if epoch_length is not None:
            local_iter = (engine.state.iteration - 1) % epoch_length
            return local_iter % acc == 0, (local_iter + 1) % acc == 0 or (local_iter + 1) == epoch_length
        local_iter = engine.state.iteration - 1
        return local_iter % acc == 0, (local_iter + 1) % acc == 0

    def _iteration(self, engine: PretrainTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """
        One pre-training iteration (see the class docstring).

        Raises:
            ValueError: when ``batchdata`` is None.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.state.output = {}

        def _compute_loss() -> None:
            terms = self._check_terms(engine.loss_function(engine.network, batch))
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output.update(terms)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        acc = engine.accumulation_steps
        should_zero_grad, should_step = self._accumulation_state(engine)
        engine.network.train()
        if should_zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                _compute_loss()
            loss = engine.state.output[self.loss_key]
            engine.scaler.scale(loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        else:
            _compute_loss()
            loss = engine.state.output[self.loss_key]
            (loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
