"""Data: phantom generator, MSD datalists and splits, input checks, transforms."""

from medcl.data.checks import CheckFilesd, check_datalist
from medcl.data.datalists import inference_datalist
from medcl.data.dataset_info import DatasetInfo, dataset_num_classes, read_dataset_info
from medcl.data.intensity import ScaleIntensityByModalityd
from medcl.data.mixed_loader import MixedLoader
from medcl.data.partners import PartnerDataset
from medcl.data.patches import RandPatchWithPositiond, as_patch_size, volume_pad_size
from medcl.data.pooled import pooled_datalist, pooled_label_maps
from medcl.data.pools import POOL_MODES, PoolPersistentDataset, make_pool_dataset
from medcl.data.splits import (
    eval_datalist,
    load_splits,
    num_labelled_cases,
    read_test_entries,
    record_split,
    split_datalist,
)

__all__ = [
    "as_patch_size",
    "check_datalist",
    "CheckFilesd",
    "DatasetInfo",
    "dataset_num_classes",
    "eval_datalist",
    "inference_datalist",
    "load_splits",
    "make_pool_dataset",
    "MixedLoader",
    "num_labelled_cases",
    "PartnerDataset",
    "POOL_MODES",
    "PoolPersistentDataset",
    "pooled_datalist",
    "pooled_label_maps",
    "RandPatchWithPositiond",
    "read_dataset_info",
    "read_test_entries",
    "record_split",
    "ScaleIntensityByModalityd",
    "split_datalist",
    "volume_pad_size",
]
