"""Inference on whole volumes, and pseudo-labelling with its optional CRF refinement."""

from medcl.inferers.crf import HAS_MONAI_CPP, crf_refine
from medcl.inferers.pseudo_labeler import PseudoLabeler, confidence_filter
from medcl.inferers.volume import SliceBatchInferer, volume_inferer

__all__ = [
    "confidence_filter",
    "crf_refine",
    "HAS_MONAI_CPP",
    "PseudoLabeler",
    "SliceBatchInferer",
    "volume_inferer",
]
