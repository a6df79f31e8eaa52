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
"""Named intermediate outputs of any ``nn.Module`` through temporary forward hooks, with optional early stop."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from torch import nn

from medcl.errors import MedclInputError

__all__ = ["FeatureTaps", "check_module_names"]

_MAX_LISTED = 500


class _StopForward(Exception):
    """Raised by the hook of the last requested module to abandon the rest of the forward pass."""

    def __init__(self, token: object) -> None:
        super().__init__("forward pass stopped early by FeatureTaps")
        self.token = token


def check_module_names(network: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """
    Look up ``names`` in ``dict(network.named_modules())``.

    Returns:
        ``{name: module}`` in the order of ``names``.

    Raises:
        MedclInputError: when a name is not a submodule of ``network``; the message suggests close names and
            lists the available ones (the first 500 when there are more).
    """
    modules = dict(network.named_modules())
    found: dict[str, nn.Module] = {}
    for name in names:
        if name not in modules:
            available = [n for n in modules if n]
            close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
            listed = ", ".join(available[:_MAX_LISTED])
            more = f" ... ({len(available) - _MAX_LISTED} more)" if len(available) > _MAX_LISTED else ""
            hint = f" Did you mean {close}?" if close else ""
            raise MedclInputError(
                f"{type(network).__name__} has no submodule named {name!r}.{hint} "
                f"Available names (dict(network.named_modules())): {listed}{more}"
            )
        found[name] = modules[name]
    return found


class FeatureTaps:
    """
    Collect the outputs of named submodules of a network during one forward pass, using forward hooks that exist
    only for the duration of the call (the network is left unchanged, its ``state_dict`` keys included).

    With ``stop_early=True`` the hook of the last requested module to run raises a private exception that is
    caught here, so modules that would run afterwards (e.g. the decoder when only the bottleneck is wanted) are
    never evaluated. The returned tensors keep their autograd graph: a loss on them backpropagates into every
    module that produced them and into nothing that was skipped.

    Example::

        taps = FeatureTaps(net, ["down_4", "upcat_4", "upcat_3"], stop_early=True)
        feats = taps(x)  # {"down_4": (B, C4, ...), "upcat_4": ..., "upcat_3": ...}, upcat_2/upcat_1 not run

        with FeatureTaps(net, ["down_4"]) as taps:  # context form, the whole forward runs
            logits = net(x)
        bottleneck = taps.outputs["down_4"]

    Notes:
        - a module called several times in one pass contributes the output of its first call;
        - the output is stored as returned by the module (a tensor, or a tuple/list/dict for such modules);
        - under ``stop_early`` the network's own return value is lost, use the tapped outputs;
        - in the context form an early stop ends the ``with`` block (the exception is suppressed there);
        - ``torch.nn.parallel.DistributedDataParallel`` around a model that stops its backbone early needs
          ``find_unused_parameters=True`` (the skipped modules receive no gradient).

    Args:
        network: any ``nn.Module`` (MONAI or not).
        names: submodule names as in ``dict(network.named_modules())``; at least one, no duplicates.
        stop_early: abandon the forward pass once every requested module has produced its output.

    Raises:
        MedclInputError: when a name is not a submodule of ``network`` (the message lists the available names).
        ValueError: when ``names`` is empty or has duplicates.
    """

    def __init__(self, network: nn.Module, names: Sequence[str], stop_early: bool = False) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("FeatureTaps needs at least one module name.")
        if len(set(names)) != len(names):
            raise ValueError(f"module names must be unique, got {names}.")
        self.network = network
        self.names = names
        self.stop_early = stop_early
        self.modules = check_module_names(network, names)
        self.outputs: dict[str, Any] = {}
        self._handles: list = []
        self._token: object | None = None

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in self.outputs:
                return
            self.outputs[name] = output
            if self.stop_early and len(self.outputs) == len(self.names):
                raise _StopForward(self._token)

        return hook

    def __enter__(self) -> FeatureTaps:
        if self._handles:
            raise RuntimeError("FeatureTaps is already active (nested use of the same instance).")
        self.outputs = {}
        self._token = object()
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        # swallow only our own early-stop signal (not one of a nested FeatureTaps on another object)
        return isinstance(exc, _StopForward) and exc.token is self._token

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """
        Run ``network(*args, **kwargs)`` and return ``{name: output}`` for every requested module, in the order
        of ``names``.

        Raises:
            RuntimeError: when a requested module did not run during the forward pass.
        """
        with self:
            self.network(*args, **kwargs)
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(
                f"modules {missing} of {type(self.network).__name__} did not run during the forward pass, "
                "so their outputs cannot be tapped."
            )
        return {n: self.outputs[n] for n in self.names}
