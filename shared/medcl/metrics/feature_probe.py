"""Probes of a network's per-pixel features: how well a frozen layer separates the classes (issue 14 item 7).

A pre-training method that helps should leave features from which the organs can be read off with a trivial
classifier. Two standard probes on the same sampled pixels:

- **k-NN** (cosine): each test pixel takes the majority class of its ``k`` most similar training pixels;
- **linear**: multinomial logistic regression on standardised features, trained full batch.

Both report the **balanced accuracy** (mean over the classes present in the test pixels of the per-class recall),
so background, which fills most of a slice, does not dominate. Comparing the probes of pre-trained, random-init and
raw-intensity features locates a missing gain: if pre-trained features are no better than random ones, the
pre-training did not learn what fine-tuning needs; if they are better but fine-tuning does not gain, the cause is
downstream (recipe, budget, selection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["balanced_accuracy", "knn_predict", "layer_features", "linear_probe_predict", "sample_pixels"]


def layer_features(network: nn.Module, images: torch.Tensor, layer: str, batch_size: int = 16) -> torch.Tensor:
    """Output of ``network``'s module ``layer`` for ``images``, resized to the images' spatial size.

    Args:
        network: the network (put in eval mode here; its weights are not changed).
        images: ``(N, C_in, *spatial)`` inputs, 2D or 3D.
        layer: a name from ``network.named_modules()``, e.g. ``"upcat_3"`` of MONAI's BasicUNet.
        batch_size: images per forward pass.

    Returns:
        ``(N, C, *spatial)`` features (bilinear / trilinear resize of the layer's output, ``align_corners=False``).

    Raises:
        KeyError: ``layer`` is not a module of ``network`` (the message lists the top-level names).
    """
    modules = dict(network.named_modules())
    if layer not in modules:
        top = [n for n, _ in network.named_children()]
        raise KeyError(f"layer {layer!r} is not a module of {type(network).__name__}; top-level modules: {top}")
    captured: list[torch.Tensor] = []
    handle = modules[layer].register_forward_hook(lambda _m, _i, out: captured.append(out))
    mode = "bilinear" if images.ndim == 4 else "trilinear"
    outputs = []
    network.eval()
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                captured.clear()
                network(images[start : start + batch_size])
                feats = captured[-1]
                outputs.append(F.interpolate(feats, size=images.shape[2:], mode=mode, align_corners=False))
    finally:
        handle.remove()
    return torch.cat(outputs)


def sample_pixels(
    features: torch.Tensor, labels: torch.Tensor, per_class: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to ``per_class`` pixels of each class present in ``labels``, without replacement.

    Args:
        features: ``(N, C, *spatial)``.
        labels: ``(N, 1, *spatial)`` or ``(N, *spatial)`` integer class map.
        per_class: pixels per class (all of a class's pixels when it has fewer).
        generator: random generator of the draw.

    Returns:
        ``(M, C)`` features and ``(M,)`` classes of the drawn pixels, grouped by class in increasing order.
    """
    flat_x = features.movedim(1, -1).reshape(-1, features.shape[1])
    flat_y = labels.reshape(-1).long()
    if flat_y.numel() != flat_x.shape[0]:
        raise ValueError(f"labels hold {flat_y.numel()} pixels but features {flat_x.shape[0]}")
    xs, ys = [], []
    for c in torch.unique(flat_y).tolist():
        idx = torch.nonzero(flat_y == c).flatten()
        pick = idx[torch.randperm(idx.numel(), generator=generator)[:per_class]]
        xs.append(flat_x[pick])
        ys.append(flat_y[pick])
    return torch.cat(xs), torch.cat(ys)


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Majority class among the ``k`` training points of highest cosine similarity to each test point.

    Ties go to the smallest class index. Args: ``train_x (M, C)``, ``train_y (M,)`` classes ≥ 0, ``test_x (T, C)``.

    Returns:
        ``(T,)`` predicted classes.
    """
    k = min(k, train_x.shape[0])
    sim = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    neighbours = train_y[sim.topk(k, dim=1).indices]  # (T, k)
    votes = F.one_hot(neighbours, int(train_y.max()) + 1).sum(1)  # (T, classes)
    return votes.argmax(1)  # argmax returns the first maximum: the smallest class on a tie


def linear_probe_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> torch.Tensor:
    """Multinomial logistic regression on features standardised by the training points' mean and sd.

    Full-batch Adam for ``steps`` steps on the mean cross-entropy + ``weight_decay``·‖W‖², weights from ``seed``.
    Args: ``train_x (M, C)``, ``train_y (M,)``, ``test_x (T, C)``.

    Returns:
        ``(T,)`` predicted classes.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(xs.shape[1], int(train_y.max()) + 1)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.01)
        linear.bias.zero_()
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(linear(xs), train_y) + weight_decay * linear.weight.pow(2).sum()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return linear(xt).argmax(1)


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, dict[int, float]]:
    """Mean over the classes present in ``target`` of the recall (share of that class's points predicted as it).

    Returns:
        ``(balanced accuracy, {class: recall})``.
    """
    recalls = {int(c): float((pred[target == c] == c).float().mean()) for c in torch.unique(target)}
    return sum(recalls.values()) / len(recalls), recalls
