"""Deprecated: the pieces of ``medcl.workflows`` moved to ``medcl.engines``, ``medcl.handlers``, ``medcl.inferers``,
``medcl.metrics``, ``medcl.networks``, ``medcl.utils`` and ``medcl.bundle``. This module re-exports them for one
release and warns on import."""

import warnings

from medcl.bundle.overrides import check_cli_overrides
from medcl.engines import LocalCLStep, PretrainTrainer
from medcl.handlers import (
    AtomicCheckpointSaver,
    NonFiniteLossError,
    NonFiniteLossGuard,
    PretrainedLoader,
    RunStateHandler,
    SafeCheckpointLoader,
    SelfTrainingHandler,
    round_of_epoch,
    run_state_path,
    total_epochs,
)
from medcl.inferers import PseudoLabeler, confidence_filter, crf_refine, volume_inferer
from medcl.metrics import pseudo_label_dice
from medcl.networks.pretrained import load_pretrained
from medcl.utils import (
    ddp_device,
    expected_sha256,
    file_sha256,
    init_process_group,
    is_rank0,
    rank_handlers,
    require_checkpoint,
    verify_sha256,
)

__all__ = [
    "AtomicCheckpointSaver",
    "LocalCLStep",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PretrainTrainer",
    "PretrainedLoader",
    "PseudoLabeler",
    "RunStateHandler",
    "SafeCheckpointLoader",
    "SelfTrainingHandler",
    "check_cli_overrides",
    "confidence_filter",
    "crf_refine",
    "ddp_device",
    "expected_sha256",
    "file_sha256",
    "init_process_group",
    "is_rank0",
    "load_pretrained",
    "pseudo_label_dice",
    "rank_handlers",
    "require_checkpoint",
    "round_of_epoch",
    "run_state_path",
    "total_epochs",
    "verify_sha256",
    "volume_inferer",
]

warnings.warn(
    "medcl.workflows is deprecated and will be removed in medcl 0.3: import from medcl.engines, medcl.handlers, "
    "medcl.inferers, medcl.metrics, medcl.networks, medcl.utils or medcl.bundle instead.",
    DeprecationWarning,
    stacklevel=2,
)
