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
"""Pre-trained weights into a network with another input-channel or class count, and the table of what loaded.

Input channels. A convolution that reads the network's input has a kernel ``W`` of shape ``(out, C, *k)``; a
checkpoint pre-trained on ``C`` channels is loaded into a network with ``C'`` channels by building ``W'`` of shape
``(out, C', *k)``:

* ``"average"`` (default): every new channel gets the mean of the pre-trained filters,
  ``W'[:, j] = mean_i W[:, i] * C / C'``;
* ``"repeat"``: the pre-trained filters are cycled, ``W'[:, j] = W[:, j mod C] * C / C'``.

The factor ``C / C'`` keeps the activation scale: an input whose ``C'`` channels all hold the same image ``x``
gives ``sum_j W'[:, j] * x = sum_i W[:, i] * x``, what the pre-trained layer gave for ``x`` in all its ``C``
channels (for ``C = 1``: the pre-trained response to ``x``). The bias and everything after the first layer are
loaded unchanged. Every kernel of the network that reads the input is adapted (UNETR: the patch embedding and
``encoder1``; a residual U-Net: the first unit's convolution and residual path), recognised as a kernel whose
checkpoint and network shapes differ only in dimension 1, from the checkpoint's input-channel count (its first
kernel's) to the network's.

Classes. The network's head (the module holding its last kernel) whose checkpoint shapes differ only in dimension
0 (the output channels) is not loaded: it keeps its fresh initialisation.

Kernels of another rank (weights of a 2D network into a 3D one) cannot be adapted: :func:`adapt_state_dict`
raises one :class:`~medcl.errors.MedclInputError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medcl.errors import MedclInputError
from medcl.weights.manifest import state_dict_facts

__all__ = ["CHANNEL_MODES", "adapt_in_channels", "adapt_state_dict", "load_table"]

CHANNEL_MODES = ("average", "repeat")


def adapt_in_channels(weight: torch.Tensor, in_channels: int, mode: str = "average") -> torch.Tensor:
    """A kernel ``(out, C, *k)`` turned into ``(out, in_channels, *k)`` by the rule of ``mode`` (module docstring).

    Args:
        weight: the pre-trained kernel, rank >= 3.
        in_channels: the new input-channel count ``C'`` (>= 1).
        mode: ``"average"`` or ``"repeat"``.

    Returns:
        a new tensor of ``weight``'s dtype and device.

    Raises:
        MedclInputError: an unknown ``mode``.
    """
    if mode not in CHANNEL_MODES:
        raise MedclInputError(
            f"pretrained channel mode {mode!r} is not one of {CHANNEL_MODES} (bundle key pretrained_channel_mode)."
        )
    c = weight.shape[1]
    scale = c / in_channels
    if mode == "average":
        mean = weight.mean(dim=1, keepdim=True)
        return (mean * scale).expand(-1, in_channels, *weight.shape[2:]).clone()
    index = torch.arange(in_channels, device=weight.device) % c
    return weight.index_select(1, index) * scale


def _only_dim_differs(a: Sequence[int], b: Sequence[int], dim: int) -> bool:
    if len(a) != len(b) or a[dim] == b[dim]:
        return False
    return all(a[i] == b[i] for i in range(len(a)) if i != dim)


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def adapt_state_dict(
    mismatched: Sequence[tuple[str, tuple, tuple]],
    ckpt: Mapping[str, torch.Tensor],
    net_sd: Mapping[str, torch.Tensor],
    mode: str = "average",
    path: str | os.PathLike = "the checkpoint",
) -> dict[str, Any]:
    """Resolve the shape mismatches between a checkpoint and a network that an input-channel or class count explains.

    Args:
        mismatched: ``(key, checkpoint shape, network shape)`` of the keys present in both with other shapes.
        ckpt: the checkpoint's state dict (keys already renamed to the network's).
        net_sd: the network's whole state dict (for its input-channel count and its head).
        mode: input-channel rule, see :func:`adapt_in_channels`.
        path: the checkpoint file, for messages.

    Returns:
        ``{"adapted": {key: new tensor}, "adapted_notes": {key: "1 -> 2 input channels (average)"},
        "fresh": {key: "5 -> 3 outputs (fresh head)"}, "mismatched": [the rest]}``.

    Raises:
        MedclInputError: a kernel of another rank (e.g. 2D weights into a 3D network): the spatial dimensions differ
            and nothing can adapt that.
    """
    if mode not in CHANNEL_MODES:
        adapt_in_channels(torch.zeros(1, 1, 1), 1, mode)  # raises the message
    net_facts, ckpt_facts = state_dict_facts(net_sd), state_dict_facts(ckpt)
    for key, have, want in mismatched:
        if key.endswith("weight") and len(have) >= 3 and len(want) >= 3 and len(have) != len(want):
            raise MedclInputError(
                f"{os.fspath(path)}: the weights are of a {len(have) - 2}D network (kernel {key} of shape "
                f"{tuple(have)}) but the network is {len(want) - 2}D (shape {tuple(want)}): kernels of another spatial "
                "rank cannot be adapted. Nothing was loaded. Fine-tune with the spatial_dims the weights were "
                f"pre-trained with (--spatial_dims {len(have) - 2}; see the file's manifest: python -m medcl.weights "
                f"inspect {os.fspath(path)}), or pre-train again with --spatial_dims {len(want) - 2}."
            )
    c_ckpt, c_net = ckpt_facts["in_channels"], net_facts["in_channels"]
    head = _module(net_facts["head"]) if net_facts["head"] else None
    adapted: dict[str, torch.Tensor] = {}
    notes: dict[str, str] = {}
    fresh: dict[str, str] = {}
    rest = []
    for key, have, want in mismatched:
        value = ckpt[key]
        if (
            c_ckpt is not None
            and c_net is not None
            and c_ckpt != c_net
            and len(have) >= 3
            and _only_dim_differs(have, want, 1)
            and (have[1], want[1]) == (c_ckpt, c_net)
        ):
            adapted[key] = adapt_in_channels(value, c_net, mode).to(net_sd[key].dtype)
            notes[key] = f"{c_ckpt} -> {c_net} input channels ({mode})"
        elif head is not None and _module(key) == head and _only_dim_differs(have, want, 0):
            fresh[key] = f"{have[0]} -> {want[0]} outputs (fresh head)"
        else:
            rest.append((key, have, want))
    return {"adapted": adapted, "adapted_notes": notes, "fresh": fresh, "mismatched": rest}


def load_table(report: Mapping[str, Any], title: str) -> str:
    """One text table of a :func:`medcl.networks.load_pretrained` report: a row per top-level module with its
    loaded (as is), adapted, skipped and missing tensor counts, then one line per adapted or fresh (head) key.

    Args:
        report: ``{"loaded", "adapted", "skipped", "missing", "mismatched", "fresh"}`` as ``load_pretrained``
            returns it (``loaded`` includes the adapted keys).
        title: the first line.

    Returns:
        the table, lines joined by ``\\n``.
    """
    adapted = dict(report.get("adapted", {}))
    fresh = dict(report.get("fresh", {}))
    columns = ("loaded", "adapted", "skipped", "missing")
    rows: dict[str, dict[str, int]] = {}

    def count(key: str, column: str) -> None:
        rows.setdefault(key.split(".", 1)[0], dict.fromkeys(columns, 0))[column] += 1

    for key in report.get("loaded", []):
        count(key, "adapted" if key in adapted else "loaded")
    for key in report.get("skipped", []):
        count(key, "skipped")
    for key, *_ in report.get("mismatched", []):
        count(key, "skipped")
    for key in fresh:
        count(key, "skipped")
    for key in report.get("missing", []):
        count(key, "missing")
    width = max([len("module"), *map(len, rows)])
    lines = [title, f"  {'module':<{width}}  " + "  ".join(f"{c:>7}" for c in columns)]
    for name, counts in rows.items():
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{counts[c]:>7}" for c in columns))
    totals = {c: sum(r[c] for r in rows.values()) for c in columns}
    lines.append(f"  {'total':<{width}}  " + "  ".join(f"{totals[c]:>7}" for c in columns))
    lines += [f"  adapted: {k}: {note}" for k, note in adapted.items()]
    lines += [f"  skipped: {k}: {note}" for k, note in fresh.items()]
    for k, c, n in report.get("mismatched", []):
        lines.append(f"  skipped: {k}: checkpoint {tuple(c)} vs network {tuple(n)}")
    return "\n".join(lines)
