# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Dense (pixel/voxel-level) SupCon loss between two feature maps: MACL's pixel-level term L_d."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from medcl.losses.supcon import (
    _check_temperatures,
    check_form,
    cross_supcon_loss,
    positional_positive_mask,
    supcon_loss,
)

__all__ = ["DenseSupConLoss"]


class DenseSupConLoss(_Loss):
    """
    Location-wise supervised contrastive loss between an auxiliary and a dominant feature map (MACL's
    pixel-level loss :math:`L_d`). At every spatial location ``s`` the ``2B`` vectors
    :math:`\\{a_b(s)\\} \\cup \\{d_b(s)\\}` (auxiliary and dominant features of the ``B`` samples) form an
    independent SupCon problem; negatives are the same location in the other samples:

    .. math::

        L = \\frac{1}{|S|} \\sum_{s \\in S} -\\frac{1}{2B} \\sum_{i=1}^{2B} \\frac{1}{|P(i)|} \\sum_{p \\in P(i)}
            \\log \\frac{\\exp(s_{ip}(s) / \\tau)}{\\sum_{a \\neq i} \\exp(s_{ia}(s) / \\tau)}

    with :math:`s_{ij}(s)` the cosine similarity of vectors ``i`` and ``j`` at location ``s``. Positives
    (``positives``):

    - ``"position"`` (default, as the public MACL code: it calls its PCL ``SupConLoss`` at every pixel
      with the batch's slice positions): :math:`P(i)` = the vectors of every sample whose position differs
      from that of ``i``'s sample by less than ``threshold``, i.e. the other branch of the same sample plus
      both branches of samples at a nearby position. Without ``positions`` it falls back to ``"sample"``.
    - ``"sample"``: only the other branch of the same sample (SimCLR-style; also what the public code's
      loss does when called without labels).

    ``form="paper"`` is MACL's eq. 10 as printed: at each location the dominant vectors :math:`Z^l_{i,s}` are the
    anchors and the auxiliary vectors :math:`\\tilde Z^l_{k,s}` the only candidates (no same-branch pairs), the
    anchor's own auxiliary vector is a positive (``j = i``) but left out of the denominator, and the anchors are
    **summed**:

    .. math::

        L_d = \\sum_{i=1}^{B} -\\frac{1}{|\\Omega^+_i|} \\sum_{j \\in \\Omega^+_i} \\frac{1}{|S|} \\sum_{s \\in S}
            \\log \\frac{\\exp(s(Z^l_{i,s}, \\tilde Z^l_{j,s}) / \\tau)}
            {\\sum_{k} \\mathbb{1}_{i \\neq k} \\exp(s(Z^l_{i,s}, \\tilde Z^l_{k,s}) / \\tau)}

    with :math:`\\Omega^+_i` the positives of the ``positives`` rule (``"position"``: :math:`|\\pi_i - \\pi_j| <
    \\delta`, ``j = i`` included; ``"sample"``: ``{i}``). Needs ``B >= 2``.

    The loss is computed for all locations at once: one batched ``(S, 2B, C) x (S, C, 2B)`` matmul, memory
    :math:`O(S \\cdot (2B)^2 + S \\cdot 2B \\cdot C)`, no loop over locations. It shares its math with
    :class:`medcl.losses.supcon.SupConLoss` (:func:`medcl.losses.supcon.supcon_loss`); locations where no
    anchor has a positive (impossible here) would be left out of the mean.

    Shapes: ``aux`` and ``dom`` ``(B, C, *spatial)`` (1D, 2D or 3D spatial), ``positions`` ``(B,)``; output: scalar.

    Reference:
        Zeng, S. et al. "Multi-level Asymmetric Contrastive Learning for Volumetric Medical Image
        Segmentation Pre-training." IEEE JBHI (MACL). https://github.com/stevezs315/MACL
    """

    def __init__(
        self,
        temperature: float = 0.1,
        threshold: float = 0.1,
        base_temperature: float | None = None,
        positives: str = "position",
        form: str = "code",
    ) -> None:
        """
        Args:
            temperature: softmax temperature :math:`\\tau`. Defaults to 0.1 (MACL).
            threshold: position difference below which two samples are positives (``positives="position"``).
                Defaults to 0.1 (MACL's CHD/KiTS scripts).
            base_temperature: if set, the loss is multiplied by ``temperature / base_temperature`` (0.07 in
                the public code). Defaults to None (no scaling).
            positives: ``"position"`` (default, public code's behaviour) or ``"sample"``, see above.
            form: ``"code"`` (default: the 2B vectors of both branches are anchors and candidates, mean over
                anchors, as the public code) or ``"paper"`` (eq. 10 as printed, see above).

        Raises:
            ValueError: for a non-positive temperature, a negative threshold or an unknown ``positives``.
            MedclInputError: for a ``form`` other than ``"code"``/``"paper"``.
        """
        super().__init__()
        _check_temperatures(temperature, base_temperature)
        if threshold < 0:
            raise ValueError(f"threshold must be non-negative, got {threshold}.")
        if positives not in ("position", "sample"):
            raise ValueError(f"positives must be 'position' or 'sample', got {positives!r}.")
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.base_temperature = None if base_temperature is None else float(base_temperature)
        self.positives = positives
        self.form = check_form(form)

    def positive_mask(self, batch_size: int, positions: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """``(2B, 2B)`` boolean mask over ``[aux_0..aux_{B-1}, dom_0..dom_{B-1}]`` (diagonal ignored by the loss)."""
        if self.positives == "position" and positions is not None:
            sample_mask = positional_positive_mask(positions.to(device), self.threshold)
        else:
            sample_mask = torch.eye(batch_size, dtype=torch.bool, device=device)
        return sample_mask.repeat(2, 2)

    def forward(self, aux: torch.Tensor, dom: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            aux: ``(B, C, *spatial)`` auxiliary-branch (projected) feature map.
            dom: ``(B, C, *spatial)`` dominant-branch feature map, same shape as ``aux``.
            positions: optional ``(B,)`` normalised positions of the samples.

        Returns:
            0-dim loss tensor (float32 for half precision inputs).

        Raises:
            ValueError: when ``aux`` and ``dom`` differ in shape, have no spatial dimension, or when
                ``positions`` does not have ``B`` elements.
        """
        if aux.shape != dom.shape:
            raise ValueError(f"aux and dom must have the same shape, got {tuple(aux.shape)} and {tuple(dom.shape)}.")
        if aux.ndim < 3:
            raise ValueError(f"aux and dom must have shape (B, C, *spatial), got {tuple(aux.shape)}.")
        b = aux.shape[0]
        if positions is not None and positions.numel() != b:
            raise ValueError(f"positions must have {b} elements (one per sample), got shape {tuple(positions.shape)}.")
        if self.form == "paper":
            if b < 2:
                raise ValueError(f"form='paper' needs B >= 2 samples (a k != i in the denominator), got B={b}.")
            # anchors: dominant vectors, candidates: auxiliary vectors; (B, C, S) -> (S, B, C)
            anchors = dom.flatten(2).permute(2, 0, 1).contiguous()
            candidates = aux.flatten(2).permute(2, 0, 1).contiguous()
            if self.positives == "position" and positions is not None:
                mask = positional_positive_mask(positions.to(aux.device), self.threshold)
            else:
                mask = torch.eye(b, dtype=torch.bool, device=aux.device)
            return cross_supcon_loss(anchors, candidates, mask, self.temperature, self.base_temperature)
        # (2B, C, S) -> (S, 2B, C): S independent problems of 2B vectors; one contiguous copy makes the
        # normalisation and the batched matmul in the core fast
        feats = torch.cat([aux, dom], dim=0).flatten(2).permute(2, 0, 1).contiguous()
        mask = self.positive_mask(b, positions, aux.device)
        return supcon_loss(feats, mask, self.temperature, self.base_temperature)
