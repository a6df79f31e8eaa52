"""Losses, one concept per module, each written from its paper's equation."""

from medcl.losses.barlow_twins_pixel import BarlowTwinsPixelLoss, pixel_cross_correlation
from medcl.losses.dense_supcon import DenseSupConLoss
from medcl.losses.feature_consistency import FeatureConsistencyLoss
from medcl.losses.label_consistency import LabelConsistencyLoss, label_relation, namespace_labels
from medcl.losses.local_contrastive import LocalContrastiveLoss, make_pairs
from medcl.losses.supcon import PositionalSupConLoss, SupConLoss, positional_positive_mask, supcon_loss

__all__ = [
    "BarlowTwinsPixelLoss",
    "DenseSupConLoss",
    "FeatureConsistencyLoss",
    "label_relation",
    "LabelConsistencyLoss",
    "LocalContrastiveLoss",
    "make_pairs",
    "namespace_labels",
    "pixel_cross_correlation",
    "positional_positive_mask",
    "PositionalSupConLoss",
    "supcon_loss",
    "SupConLoss",
]
