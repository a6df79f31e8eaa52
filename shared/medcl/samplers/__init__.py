"""Pixel samplers for contrastive losses."""

from medcl.samplers.boundary_weighted import (
    BoundaryWeightedPixelSampler,
    boundary_distance_weights,
    gather_pixel_features,
    labels_to_resolution,
    sample_class_pixels,
)

__all__ = [
    "boundary_distance_weights",
    "BoundaryWeightedPixelSampler",
    "gather_pixel_features",
    "labels_to_resolution",
    "sample_class_pixels",
]
