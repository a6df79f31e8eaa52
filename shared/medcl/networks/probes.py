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
Shape probes on a segmentation network: a tiny forward pass in eval mode that leaves the network as it was, to
read the channels of tapped modules and to find which modules feed them (what a pre-training method trains, hence
what fine-tuning should load).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from medcl.errors import MedclInputError
from medcl.networks.feature_taps import FeatureTaps

__all__ = ["input_size_of", "probe_mode", "run_probe", "tapped_prefixes"]

_PROBE_SIZES = {1: (16, 32, 64, 128, 256, 512), 2: (16, 32, 64, 128, 256), 3: (16, 32, 64, 128)}


def input_size_of(network: nn.Module) -> tuple[int, ...] | None:
    """The one input size a network accepts when it has one (a ViT-based net: ``feat_size * patch_size``, e.g.
    :class:`~monai.networks.nets.UNETR`), else None."""
    feat, patch = getattr(network, "feat_size", None), getattr(network, "patch_size", None)
    if feat is None or patch is None:
        return None
    return tuple(int(f) * int(p) for f, p in zip(feat, patch, strict=True))


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a module output (a tensor, or a tuple/list of them, e.g. a ViT's ``(x, hidden_states)``)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    return []


def input_conv(backbone: nn.Module) -> nn.Module:
    """The first (non-transposed) convolution in registration order: the input layer of every supported net."""
    for module in backbone.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            return module
    raise MedclInputError(
        f"cannot infer the input channels of {type(backbone).__name__} (no convolution); pass an example input."
    )


@contextmanager
def probe_mode(backbone: nn.Module):
    """Eval mode (no batch-norm statistics update, batch of 1 allowed) and trainable parameters, then restore."""
    modes = [(m, m.training) for m in backbone.modules()]
    flags = [(p, p.requires_grad) for p in backbone.parameters()]
    backbone.eval()
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def example_inputs(
    backbone: nn.Module,
    spatial_dims: int | None,
    example_input: torch.Tensor | None,
    in_channels: int | None = None,
    size: int | Sequence[int] | None = None,
):
    """Candidate probe inputs, smallest first (a single one when ``example_input`` or ``size`` is given)."""
    if example_input is not None:
        yield example_input
        return
    conv = None if in_channels is not None and spatial_dims is not None else input_conv(backbone)
    channels = in_channels if in_channels is not None else conv.in_channels
    dims = spatial_dims or len(conv.kernel_size)
    weight = next(backbone.parameters())
    fixed = input_size_of(backbone) if size is None else tuple(_as_size(size, dims))
    sizes = [fixed] if fixed is not None else [(s,) * dims for s in _PROBE_SIZES[dims]]
    for spatial in sizes:
        yield torch.zeros((1, channels, *spatial), dtype=weight.dtype, device=weight.device)


def _as_size(size: int | Sequence[int], dims: int) -> list[int]:
    return [int(size)] * dims if isinstance(size, int) else [int(s) for s in size]


def _record_grad_fn(grad_fns: dict[nn.Module, Any], module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (``grad_fns`` bound by :func:`functools.partial`): a module's first tensor output's grad_fn."""
    if isinstance(output, torch.Tensor) and module not in grad_fns:
        grad_fns[module] = output.grad_fn


def run_probe(backbone, names, spatial_dims, example_input, collect_outputs: bool, in_channels=None, size=None):
    """Run the backbone up to the last of ``names``; return (tap outputs, {module: output grad_fn})."""
    last_error: Exception | None = None
    for x in example_inputs(backbone, spatial_dims, example_input, in_channels, size):
        grad_fns: dict[nn.Module, Any] = {}
        handles = []
        if collect_outputs:
            record = partial(_record_grad_fn, grad_fns)  # this probe's dict, bound now
            handles = [m.register_forward_hook(record) for m in backbone.modules()]
        try:
            outputs = FeatureTaps(backbone, names, stop_early=True)(x)
            return outputs, grad_fns
        except MedclInputError:
            raise
        except Exception as e:  # too small for this network: try the next size
            last_error = e
        finally:
            for h in handles:
                h.remove()
    raise MedclInputError(
        f"could not run {type(backbone).__name__} up to {names[-1]!r} on a probe input: {last_error}. "
        "Pass an example input (example_input= / probe_size=) that the network accepts."
    ) from last_error


def autograd_graph(roots: Sequence[torch.Tensor]) -> tuple[set, set[int]]:
    """Nodes of the autograd graph reachable from ``roots`` and ids of the leaf tensors (parameters) in it."""
    seen: set = set()
    leaves: set[int] = set()
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return seen, leaves


def tapped_prefixes(backbone: nn.Module, names: Sequence[str], example_input: torch.Tensor | None = None) -> list[str]:
    """
    ``state_dict`` key prefixes (module names) of the parts of ``backbone`` whose parameters feed the outputs of
    the modules ``names``: what a loss on those outputs trains.

    A tiny forward pass (eval mode, batch 1, no state change) runs the backbone up to the last of ``names`` and
    keeps every module whose parameters are in the autograd graph of the tapped outputs, plus parameter-free
    modules with buffers whose output is in that graph. The result is compressed to the largest subtrees that are
    selected entirely; modules reachable under several names are listed under every name. A key ``k`` belongs to
    prefix ``p`` when ``k == p`` or ``k`` starts with ``p + "."``.

    Args:
        backbone: the network (not wrapped in DDP).
        names: tapped module names, as in ``dict(backbone.named_modules())``.
        example_input: an input the network accepts, ``(1, C, *spatial)``; by default zeros of the input
            convolution's channels and the network's fixed input size (ViT-based nets) or the smallest cubic size
            among 16, 32, 64, ... that runs.

    Raises:
        MedclInputError: when no parameter feeds the taps, or no probe input runs.
    """
    names = list(names)
    with probe_mode(backbone), torch.enable_grad():
        outputs, grad_fns = run_probe(backbone, names, None, example_input, collect_outputs=True)
        nodes, leaves = autograd_graph([t for n in names for t in _tensors(outputs[n])])
        selected: set[int] = set()
        for module in backbone.modules():
            own_params = list(module.parameters(recurse=False))
            if own_params:
                if any(id(p) in leaves for p in own_params):
                    selected.add(id(module))
            elif list(module.buffers(recurse=False)) and grad_fns.get(module) in nodes:
                selected.add(id(module))
    # state-dict keys of every module under each of its names
    by_name = dict(backbone.named_modules(remove_duplicate=False))
    owner = {key: id(by_name[key.rpartition(".")[0]]) for key in backbone.state_dict(keep_vars=True)}
    chosen = {k for k, m in owner.items() if m in selected}
    if not chosen:
        raise MedclInputError(f"no parameter of {type(backbone).__name__} feeds the taps {names}.")
    prefixes: list[str] = []
    for name, _ in backbone.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(p + ".") for p in prefixes):
            continue
        under = [k for k in owner if k.startswith(name + ".")]
        if under and all(k in chosen for k in under):
            prefixes.append(name)
    return prefixes
