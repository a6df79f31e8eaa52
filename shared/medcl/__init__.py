"""medcl: label-efficient 3D medical image segmentation as MONAI bundles."""

__version__ = "0.1.0"
