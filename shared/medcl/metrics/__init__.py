"""Metrics computed from files on disk: the quality of pseudo-labels against true labels."""

from medcl.metrics.pseudo_label_dice import pseudo_label_dice

__all__ = [
    "pseudo_label_dice",
]
