"""Networks: feature taps on any MONAI network, projection heads, method-specific wrappers."""

from medcl.networks.contrastive_head import ContrastiveHead
from medcl.networks.feature_taps import FeatureTaps
from medcl.networks.macl import BACKBONE_TAPS, MACLPretrainModel, pretrained_prefixes
from medcl.networks.pretrained import load_pretrained
from medcl.networks.projectors import ImageProjector, PixelProjector
from medcl.networks.seg_contrast import SegContrastNet

__all__ = [
    "BACKBONE_TAPS",
    "ContrastiveHead",
    "FeatureTaps",
    "ImageProjector",
    "load_pretrained",
    "MACLPretrainModel",
    "PixelProjector",
    "pretrained_prefixes",
    "SegContrastNet",
]
