"""Engines: the pre-training trainer (a MONAI SupervisedTrainer whose iteration calls a step) and each method's step."""

from medcl.engines.localcl_step import LocalCLStep
from medcl.engines.macl_step import MACLStep, MACLViewsModel
from medcl.engines.mixcl_step import MIXCL_VIEW_KEYS, MixCLStep
from medcl.engines.pretrain_trainer import PretrainTrainer, prepare_dict_batch

__all__ = [
    "LocalCLStep",
    "MACLStep",
    "MACLViewsModel",
    "MIXCL_VIEW_KEYS",
    "MixCLStep",
    "prepare_dict_batch",
    "PretrainTrainer",
]
