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
"""Local (pixel-to-class-mean) contrastive loss with ground-truth / pseudo-labels (Chaitanya et al., MedIA 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction, convert_to_tensor
from torch.nn.modules.loss import _Loss

from medcl.errors import MedclInputError
from medcl.samplers.boundary_weighted import labels_to_resolution, sample_class_pixels

__all__ = ["LocalContrastiveLoss", "make_pairs"]

_POSITIVES = ("inter", "intra")
_DENOMINATORS = ("shared", "per_positive")
_NORMALIZERS = ("code", "paper")


def make_pairs(batch_size: int, layout: str = "consecutive", device: torch.device | str | None = None) -> torch.Tensor:
    """
    Pair indices for a contrastive batch.

    Args:
        batch_size: ``B``, must be even.
        layout: ``"consecutive"``: ``(0, 1), (2, 3), ...``; ``"halves"``: ``(i, i + B/2)`` for ``i < B/2``,
            i.e. the batch is ``[view-1 images, view-2 images]`` (the layout of the public TF code).
        device: device of the result.

    Returns:
        ``(B/2, 2)`` long tensor.

    Raises:
        ValueError: for an odd (or zero) ``batch_size`` or an unknown ``layout``.
    """
    if batch_size <= 0 or batch_size % 2:
        raise ValueError(f"automatic pairing needs a positive even batch size, got {batch_size}; pass `pairs`.")
    half = batch_size // 2
    if layout == "consecutive":
        return torch.arange(batch_size, device=device).reshape(half, 2)
    if layout == "halves":
        first = torch.arange(half, device=device)
        return torch.stack([first, first + half], dim=1)
    raise ValueError(f"layout must be 'consecutive' or 'halves', got {layout!r}.")


def _label_values(lab: torch.Tensor) -> torch.Tensor:
    """Sorted distinct values of an integer label tensor (a histogram when the value range is small)."""
    if lab.numel() == 0:
        return lab.reshape(-1)
    lo, hi = int(lab.min()), int(lab.max())
    if hi - lo < 65536:
        hist = torch.bincount((lab.reshape(-1) - lo), minlength=hi - lo + 1)
        return torch.nonzero(hist).reshape(-1) + lo
    return torch.unique(lab)


class LocalContrastiveLoss(_Loss):
    """
    Local contrastive loss of Chaitanya et al. (MedIA 2023): pixel embeddings are pulled towards the mean
    embedding of their (ground-truth or pseudo-) label class and pushed away from the means of the other
    foreground classes.

    The contrastive batch is a set of image pairs ``(x, x')`` (``pairs``), each image with its own intensity
    augmentation, and labels that are ground truth for labelled images and pseudo-labels for unlabelled ones.
    For an image ``u`` of a pair let :math:`z_u(i)` be the embedding of pixel ``i`` (the contrastive head's
    output, not normalised), :math:`C_u` the foreground classes present in ``u``,

    .. math::
        \\mu_u^k = \\frac{1}{|\\Omega_u^k|} \\sum_{i \\in \\Omega_u^k} z_u(i)

    the mean embedding over *all* pixels :math:`\\Omega_u^k` of class ``k`` in ``u`` and
    :math:`s(a, b) = a^\\top b / (\\|a\\| \\|b\\|)` the cosine similarity (so the mean is L2-normalised
    after averaging). Only classes present in *both* images, :math:`C = C_x \\cap C_{x'}`, get anchors:
    ``n = num_anchors`` pixels :math:`a_{u,c,j}` of class ``c`` are drawn uniformly in each image ``u``.
    With :math:`V(u)` the images whose class means an anchor of ``u`` is compared with, i.e.
    :math:`V(u) = \\{x, x'\\}` (``positives="inter"``, default) or :math:`V(u) = \\{u\\}` (``"intra"``), the
    loss of an anchor ``a`` of class ``c`` in image ``u`` is

    .. math::
        \\ell(a) = \\sum_{v \\in V(u)} -\\log \\frac{\\exp(s(z_u(a), \\mu_v^c) / \\tau)}
            {\\sum_{w \\in V(u)} \\sum_{k \\in C_w} \\exp(s(z_u(a), \\mu_w^k) / \\tau)}

    (one term per positive, all sharing one denominator that contains the positives themselves), and

    .. math::
        L_{(x, x')} = \\frac{1}{n \\, |C| \\, |V|} \\sum_{c \\in C} \\sum_{u \\in \\{x, x'\\}}
            \\sum_{j=1}^{n} \\ell(a_{u,c,j}),
        \\qquad L = \\frac{1}{|P_{valid}|} \\sum_{(x, x') \\in P_{valid}} L_{(x, x')}

    where :math:`P_{valid}` are the pairs with :math:`C \\neq \\emptyset`. This is the public code's form
    (``denominator="shared"``, ``normalizer="code"``, the defaults). The paper's equation (MedIA 2023, local loss:
    mean over pairs, classes and the sampled pixels :math:`R_c` of class ``c``; for each positive class mean one
    term whose denominator is that positive plus the negatives, the means of the other classes) is

    .. math::
        \\ell^{paper}(a) = \\sum_{v \\in V(u)} -\\log \\frac{\\exp(s(z_u(a), \\mu_v^c) / \\tau)}
            {\\exp(s(z_u(a), \\mu_v^c) / \\tau) + \\sum_{w \\in V(u)} \\sum_{k \\in C_w, k \\neq c}
            \\exp(s(z_u(a), \\mu_w^k) / \\tau)},
        \\qquad L_{(x, x')} = \\frac{1}{|C|} \\sum_{c \\in C} \\frac{1}{|R_c|} \\sum_{a \\in R_c} \\ell^{paper}(a)

    with :math:`R_c` the :math:`2n` anchors of class ``c`` in both images: ``denominator="per_positive"``
    (the other positive leaves the denominator; identical to ``"shared"`` with ``"intra"``) and
    ``normalizer="paper"`` (the anchor mean; the code's normaliser is the same for ``"inter"`` and twice it for
    ``"intra"``). With ``"inter"`` (:math:`|V| = 2`)
    :math:`L_{(x,x')}` is the mean over the pair's :math:`2n|C|` anchors of their two-term loss; with
    ``"intra"`` it is twice the anchor mean (the code's normaliser, kept). With precomputed ``anchors``,
    :math:`n |C|` is replaced by half the number of valid anchors of the pair. Background (``background``)
    gives no anchors, no means and no denominator terms; a class absent from one image of the pair gives no
    anchors in either image but its mean in the other image still enters the denominators; a class present in
    no image contributes nothing; pairs without valid anchors are left out of the mean; if no pair is valid the
    loss is 0 (with a gradient graph).

    Public code (github.com/krishnabits001/pseudo_label_contrastive_training, ``models.py``
    ``modelObj.joint_tr_unet_seg_loss_and_local_cont_loss``, ``utils.py`` ``calc_pos_neg_index``,
    ``train_model/prop_method_joint_tr_rand_init.py``) and how this module relates to it:

    - ``local_loss_exp_no=1`` (the script's default) is ``positives="inter"``, ``0`` is ``"intra"``;
      temperature 0.1, 3 anchors per class and image, drawn with replacement (``np.random.randint``), which
      is ``anchor_replacement=True`` here (uniform positions inside each class's run of the label-sorted pixels;
      without replacement the draws use :func:`medcl.samplers.boundary_weighted.sample_class_pixels`).
    - means are over all class pixels of the raw head output and normalised only inside the cosine
      (``normalize_before_mean=False``); gradients flow through the means (``detach_means=False``).
    - the code divides each pair by the *nominal* count ``n (K - 1) |V|`` (``K`` = number of classes); its
      training script only feeds images that contain every class, where this equals the valid count used
      here. Pass ``num_classes=K`` to use the nominal divisor (and to average over all pairs, valid or not,
      as the code divides by the number of pairs).
    - not reproduced: the code accumulates the loss over pairs and divides the running sum by
      ``n (K - 1) |V|`` inside the pair loop, so earlier pairs are divided again at every later pair (a
      pair's weight decays geometrically, only the last pairs count). Here every pair is normalised once and
      pairs are averaged. Terms whose cosine is exactly 0 or whose anchor embedding is exactly zero are
      skipped by the code's NaN/zero guards; here they count.
    - the code pairs image ``i`` with image ``i + B/2``; the default here is consecutive pairs, use
      ``pairs="halves"`` for the code's layout.

    Shapes: ``embeddings`` ``(B, C, *spatial)`` (2D or 3D), ``labels`` ``(B, 1, *spatial')`` integer
    (resampled by nearest neighbour to the embedding grid if ``spatial' != spatial``), ``pairs`` ``(P, 2)``;
    output: scalar (``reduction="mean"``/``"sum"``) or ``(P,)`` (``"none"``).

    Reference:
        Chaitanya, K., Erdil, E., Karani, N., Konukoglu, E., "Local contrastive loss with pseudo-label based
        self-training for semi-supervised medical image segmentation", Medical Image Analysis 87, 102792, 2023.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        num_anchors: int = 3,
        background: int | None = 0,
        positives: str = "inter",
        num_classes: int | None = None,
        anchor_replacement: bool = True,
        normalize_before_mean: bool = False,
        detach_means: bool = False,
        resize_mode: str = "nearest",
        reduction: LossReduction | str = LossReduction.MEAN,
        eps: float = 1e-12,
        ignore_index: int | None = None,
        denominator: str = "shared",
        normalizer: str = "code",
    ) -> None:
        """
        Args:
            temperature: :math:`\\tau`. Defaults to 0.1 (code and paper).
            num_anchors: ``n``, anchors drawn per foreground class and image. Defaults to 3 (code).
            background: label excluded from anchors, means and denominators; None: every label is a class.
                Defaults to 0.
            positives: ``"inter"`` (default, the code's default ``local_loss_exp_no=1``): an anchor's
                positives are its class mean in both images of the pair and the denominator holds the
                foreground means of both images; ``"intra"`` (``local_loss_exp_no=0``): own image only.
            num_classes: None (default): normalise each pair by its valid anchors and average over valid
                pairs. An int ``K``: the code's nominal normaliser ``n (K - 1) |V|`` (``K - 1`` = number of
                non-background classes in ``range(K)``) and the mean over all pairs; labels must be ``< K``.
            anchor_replacement: draw the ``n`` anchors of a class with replacement (default, as the code) or
                without (when the class has at least ``n`` pixels).
            normalize_before_mean: L2-normalise pixel embeddings before averaging them into class means.
                Defaults to False (code: mean of raw embeddings, normalised in the cosine).
            detach_means: stop gradients through the class means. Defaults to False (code).
            resize_mode: nearest-neighbour rule for resampling labels to the embedding grid, see
                :func:`medcl.samplers.boundary_weighted.labels_to_resolution`. Defaults to ``"nearest"``.
            reduction: ``"mean"`` (default, see above), ``"sum"`` (sum of the pair losses) or ``"none"``
                (``(P,)`` pair losses, 0 for pairs without valid anchors).
            eps: lower bound of a vector norm in the cosine. Defaults to 1e-12.
            ignore_index: label of voxels to leave out (e.g. pseudo-labels removed by
                :func:`medcl.inferers.confidence_filter`, 255): they are treated as ``background``, i.e. give
                no anchors, no class means and no denominator terms. None (default): every label value counts.
            denominator: ``"shared"`` (default, code): one denominator per anchor over every foreground class mean
                of :math:`V(u)`, both positives included; ``"per_positive"`` (paper): each positive term's
                denominator is that positive plus the other classes' means of :math:`V(u)`.
            normalizer: ``"code"`` (default): divide a pair by :math:`n |C| |V|`; ``"paper"``: by its number of
                valid anchors (the mean over anchors of the summed positive terms). Only with ``num_classes=None``.

        Raises:
            MedclInputError: for a misspelt ``positives``, ``denominator`` or ``normalizer`` (the message names
                the allowed values).
            ValueError: for a non-positive temperature, ``num_anchors < 1``, an unknown ``positives`` or
                ``resize_mode``, ``num_classes`` leaving no foreground class, or ``ignore_index`` without a
                ``background`` label (or equal to it).
        """
        super().__init__(reduction=LossReduction(reduction).value)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got {num_anchors}.")
        for name, value, allowed in (
            ("positives", positives, _POSITIVES),
            ("denominator", denominator, _DENOMINATORS),
            ("normalizer", normalizer, _NORMALIZERS),
        ):
            if value not in allowed:
                raise MedclInputError(
                    f"LocalContrastiveLoss: {name} must be one of {', '.join(allowed)}; got {value!r}."
                )
        if normalizer == "paper" and num_classes is not None:
            raise MedclInputError("LocalContrastiveLoss: normalizer='paper' needs num_classes=None (the valid count).")
        if resize_mode not in ("nearest", "nearest-exact"):
            raise ValueError(f"resize_mode must be 'nearest' or 'nearest-exact', got {resize_mode!r}.")
        if num_classes is not None:
            n_fg = int(num_classes) - int(background is not None and 0 <= background < num_classes)
            if n_fg < 1:
                raise ValueError(f"num_classes={num_classes} leaves no foreground class (background={background}).")
        if ignore_index is not None and (background is None or int(ignore_index) == int(background)):
            raise ValueError(
                f"ignore_index={ignore_index} needs a distinct background label (ignored voxels are excluded as "
                f"background is), got background={background}."
            )
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.temperature = float(temperature)
        self.num_anchors = int(num_anchors)
        self.background = None if background is None else int(background)
        self.positives = positives
        self.denominator = denominator
        self.normalizer = normalizer
        self.num_classes = None if num_classes is None else int(num_classes)
        self.anchor_replacement = bool(anchor_replacement)
        self.normalize_before_mean = bool(normalize_before_mean)
        self.detach_means = bool(detach_means)
        self.resize_mode = resize_mode
        self.eps = float(eps)

    # ------------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------------

    def _prepare_labels(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Check shapes; return ``(B, N)`` long labels on the embedding grid and device."""
        if embeddings.ndim not in (4, 5):
            raise ValueError(f"embeddings must be (B, C, H, W[, D]), got shape {tuple(embeddings.shape)}.")
        lab = convert_to_tensor(labels, track_meta=False)
        if lab.ndim != embeddings.ndim or lab.shape[1] != 1:
            raise ValueError(
                f"labels must be (B, 1, *spatial) with {embeddings.ndim - 2} spatial dims, "
                f"got shape {tuple(lab.shape)}."
            )
        if lab.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels have batch size {lab.shape[0]}, embeddings {embeddings.shape[0]}.")
        if lab.is_floating_point():
            lab = lab.round()
        lab = lab.to(device=embeddings.device, dtype=torch.long)
        if tuple(lab.shape[2:]) != tuple(embeddings.shape[2:]):
            lab = labels_to_resolution(lab, embeddings.shape[2:], mode=self.resize_mode)
        if self.ignore_index is not None:
            lab = lab.masked_fill(lab == self.ignore_index, self.background)
        if self.num_classes is not None and lab.numel() and int(lab.max()) >= self.num_classes:
            raise ValueError(f"labels contain {int(lab.max())} >= num_classes={self.num_classes}.")
        return lab.reshape(lab.shape[0], -1)

    @staticmethod
    def _prepare_pairs(pairs: torch.Tensor | str | None, batch_size: int, device: torch.device) -> torch.Tensor:
        if pairs is None or isinstance(pairs, str):
            return make_pairs(batch_size, "consecutive" if pairs is None else pairs, device=device)
        p = convert_to_tensor(pairs, track_meta=False).to(device=device)
        if p.ndim != 2 or p.shape[1] != 2 or p.is_floating_point():
            raise ValueError(f"pairs must be an integer (P, 2) tensor, got shape {tuple(p.shape)} ({p.dtype}).")
        p = p.long()
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= batch_size):
            raise ValueError(f"pair indices must be in [0, {batch_size}), got range [{int(p.min())}, {int(p.max())}].")
        return p

    # ------------------------------------------------------------------------------------------------
    # anchors
    # ------------------------------------------------------------------------------------------------

    def _draw(self, label: torch.Tensor, classes: list[int], generator: torch.Generator | None) -> torch.Tensor:
        """``n`` uniform draws per class of ``classes`` from one flat label map (flat indices)."""
        if not classes:
            return torch.zeros(0, dtype=torch.long, device=label.device)
        wanted = torch.as_tensor(classes, device=label.device)
        if self.anchor_replacement:
            # n uniform draws with replacement per class (the code's np.random.randint): sort the pixels by label
            # once, then draw positions inside each class's run of the sorted order
            sorted_lab, order = torch.sort(label, stable=True)
            start = torch.searchsorted(sorted_lab, wanted)
            count = torch.searchsorted(sorted_lab, wanted, right=True) - start
            u = torch.rand(len(classes), self.num_anchors, generator=generator, device=label.device)
            offset = torch.minimum((u * count[:, None]).long(), count[:, None] - 1)
            return order[(start[:, None] + offset).reshape(-1)]  # class-major: class 0 draws, class 1 draws, ...
        # restrict the sampler to the wanted classes' pixels once (same per-class draws, smaller arrays)
        members = torch.nonzero((label[:, None] == wanted[None, :]).any(dim=1)).reshape(-1)
        idx, _ = sample_class_pixels(label[members], self.num_anchors, classes=classes, generator=generator)
        return members[idx]

    def sample_anchors(
        self,
        labels: torch.Tensor,
        pairs: torch.Tensor | str | None = None,
        size: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Draw the anchors :meth:`forward` would draw (same generator state gives the same anchors).

        Args:
            labels: ``(B, 1, *spatial)`` integer labels.
            pairs: as in :meth:`forward`.
            size: embedding grid to resample the labels to first (None: keep).
            generator: torch generator on the labels' device.

        Returns:
            one ``(first, second)`` tuple per pair: flat indices (into the flattened grid) of the anchors in
            the pair's first and second image, ``n`` per foreground class present in both, class-ascending.
        """
        lab = convert_to_tensor(labels, track_meta=False)
        if lab.ndim not in (4, 5) or lab.shape[1] != 1:
            raise ValueError(f"labels must be (B, 1, H, W[, D]), got shape {tuple(lab.shape)}.")
        if lab.is_floating_point():
            lab = lab.round()
        lab = lab.long()
        if size is not None and tuple(size) != tuple(lab.shape[2:]):
            lab = labels_to_resolution(lab, size, mode=self.resize_mode)
        flat = lab.reshape(lab.shape[0], -1)
        p = self._prepare_pairs(pairs, flat.shape[0], flat.device)
        fg = []
        for b in range(flat.shape[0]):
            vals = set(_label_values(flat[b]).tolist())
            fg.append(vals - {self.background} if self.background is not None else vals)
        out = []
        for i, j in p.tolist():
            shared = sorted(fg[i] & fg[j])
            out.append((self._draw(flat[i], shared, generator), self._draw(flat[j], shared, generator)))
        return out

    # ------------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------------

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        pairs: torch.Tensor | str | None = None,
        generator: torch.Generator | None = None,
        anchors: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            embeddings: ``(B, C, *spatial)`` contrastive-head output (2D or 3D), not normalised.
            labels: ``(B, 1, *spatial')`` integer ground truth or pseudo-labels (float label maps are
                rounded); resampled by nearest neighbour to ``spatial`` if the sizes differ.
            pairs: ``(P, 2)`` integer tensor of batch indices forming the pairs; ``"consecutive"`` or None
                (default): ``(0, 1), (2, 3), ...``; ``"halves"``: ``(i, i + B/2)`` (public code's layout).
            generator: torch generator (on the embeddings' device) for the anchor draws.
            anchors: optional precomputed anchors, one ``(first, second)`` tuple of flat-index tensors per
                pair (see :meth:`sample_anchors`); an anchor's class is its label. Anchors on background or
                on a class absent from the other image of the pair are ignored.

        Returns:
            scalar loss (``"mean"``, ``"sum"``) or ``(P,)`` pair losses (``"none"``); float32 for half
            precision inputs.

        Raises:
            ValueError: on wrong or mismatched shapes of ``embeddings``, ``labels``, ``pairs`` or ``anchors``,
                an odd batch with automatic pairing, pair indices out of range, labels ``>= num_classes``.
        """
        lab = self._prepare_labels(embeddings, labels)
        bsz, ch = embeddings.shape[:2]
        npix = lab.shape[1]
        device = embeddings.device
        p = self._prepare_pairs(pairs, bsz, device)
        n_pairs = p.shape[0]
        if anchors is not None and len(anchors) != n_pairs:
            raise ValueError(f"anchors must have one (first, second) entry per pair ({n_pairs}), got {len(anchors)}.")

        dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
        with torch.autocast(device_type=device.type, enabled=False):
            emb = embeddings.to(dtype).reshape(bsz, ch, npix)
            zero = emb.sum() * 0.0  # a zero that keeps the graph

            # foreground classes of the batch and their per-image means (one batched matmul)
            cls = _label_values(lab)
            if self.background is not None:
                cls = cls[cls != self.background]
            n_cls = cls.numel()
            if n_cls == 0 or n_pairs == 0:
                return self._reduce(zero.expand(n_pairs).clone(), 0, zero)
            onehot = (lab[:, None, :] == cls[None, :, None]).to(dtype)  # (B, K, N)
            counts = onehot.sum(dim=2)  # (B, K)
            present = counts > 0
            src = F.normalize(emb, dim=1, eps=self.eps) if self.normalize_before_mean else emb
            means = torch.bmm(onehot, src.transpose(1, 2)) / counts.clamp_min(1.0)[..., None]  # (B, K, C)
            if self.detach_means:
                means = means.detach()
            mu = F.normalize(means, dim=2, eps=self.eps)

            # anchor records: batch item, partner, flat index, class column, pair
            cls_list = cls.tolist()
            # foreground label values present in each batch item (background is not in ``cls``)
            fg = [{cls_list[k] for k in torch.nonzero(row).reshape(-1).tolist()} for row in present.cpu()]
            rec_b, rec_o, rec_i, rec_p = [], [], [], []
            for q, (i, j) in enumerate(p.tolist()):
                shared = sorted(fg[i] & fg[j])
                if not shared:
                    continue
                if anchors is None:
                    first = self._draw(lab[i], shared, generator)
                    second = self._draw(lab[j], shared, generator)
                else:
                    first, second = (self._check_anchor_idx(a, npix, device) for a in anchors[q])
                for b, o, idx in ((i, j, first), (j, i, second)):
                    rec_b.append(torch.full_like(idx, b))
                    rec_o.append(torch.full_like(idx, o))
                    rec_i.append(idx)
                    rec_p.append(torch.full_like(idx, q))
            if not rec_i:
                return self._reduce(zero.expand(n_pairs).clone(), 0, zero)
            ab, ob, ai, ap = (torch.cat(r) for r in (rec_b, rec_o, rec_i, rec_p))
            # keep anchors whose class is a foreground class present in both images of their pair
            a_lab = lab[ab, ai]
            col = torch.searchsorted(cls, a_lab).clamp_max(n_cls - 1)
            valid = (cls[col] == a_lab) & present[ab, col] & present[ob, col]
            ab, ob, ai, ap, col = ab[valid], ob[valid], ai[valid], ap[valid], col[valid]
            if ab.numel() == 0:
                return self._reduce(zero.expand(n_pairs).clone(), 0, zero)

            z = F.normalize(emb[ab, :, ai], dim=1, eps=self.eps)  # (A, C)
            neg_inf = torch.finfo(dtype).min
            own = (torch.einsum("ac,akc->ak", z, mu[ab]) / self.temperature).masked_fill(~present[ab], neg_inf)
            views = [own]
            if self.positives == "inter":
                views.append(
                    (torch.einsum("ac,akc->ak", z, mu[ob]) / self.temperature).masked_fill(~present[ob], neg_inf)
                )
            n_views = len(views)
            positives = [v.gather(1, col[:, None])[:, 0] for v in views]
            if self.denominator == "shared":
                lse = torch.logsumexp(torch.cat(views, dim=1), dim=1)
                per_anchor = sum(lse - pos for pos in positives)
            else:  # the positive plus the other classes' means of every image in V(u)
                is_pos = torch.zeros_like(own, dtype=torch.bool).scatter_(1, col[:, None], True)
                neg_lse = torch.logsumexp(torch.cat([v.masked_fill(is_pos, neg_inf) for v in views], dim=1), dim=1)
                per_anchor = sum(torch.logaddexp(pos, neg_lse) - pos for pos in positives)

            anchors_per_pair = torch.zeros(n_pairs, dtype=dtype, device=device).index_add_(
                0, ap, torch.ones_like(per_anchor)
            )
            if self.num_classes is None and self.normalizer == "paper":
                norm = anchors_per_pair.clamp_min(1e-30)  # 1/|C| sum_c 1/|R_c| sum_{R_c}, |R_c| = 2n for every c
            elif self.num_classes is None:
                # n |C| |V| = (valid anchors of the pair / 2) * |V|
                norm = (anchors_per_pair * n_views / 2.0).clamp_min(1e-30)
            else:
                n_fg = self.num_classes - int(self.background is not None and 0 <= self.background < self.num_classes)
                norm = torch.full((n_pairs,), float(self.num_anchors * n_fg * n_views), dtype=dtype, device=device)
            pair_loss = torch.zeros(n_pairs, dtype=dtype, device=device).index_add_(0, ap, per_anchor) / norm
            n_valid = int((anchors_per_pair > 0).sum())
            return self._reduce(pair_loss + zero, n_valid, zero)

    @staticmethod
    def _check_anchor_idx(idx: torch.Tensor, npix: int, device: torch.device) -> torch.Tensor:
        t = convert_to_tensor(idx, track_meta=False).to(device=device).reshape(-1)
        if t.is_floating_point():
            raise ValueError("anchor indices must be integers.")
        t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= npix):
            raise ValueError(f"anchor indices must be flat indices in [0, {npix}).")
        return t

    def _reduce(self, pair_loss: torch.Tensor, n_valid: int, zero: torch.Tensor) -> torch.Tensor:
        if self.reduction == LossReduction.NONE.value:
            return pair_loss
        if self.reduction == LossReduction.SUM.value:
            return pair_loss.sum() + zero
        denom = pair_loss.numel() if self.num_classes is not None else n_valid
        if denom == 0:
            return zero
        return pair_loss.sum() / denom
