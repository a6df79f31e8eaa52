"""Utilities the bundles share: checkpoint files (paths, sha256, state-dict comparison) and distributed set-up."""

from medcl.utils.checkpoints import compare_state_dicts, expected_sha256, file_sha256, require_checkpoint, verify_sha256
from medcl.utils.distributed import ddp_device, init_process_group, is_rank0, rank_handlers

__all__ = [
    "compare_state_dicts",
    "ddp_device",
    "expected_sha256",
    "file_sha256",
    "init_process_group",
    "is_rank0",
    "rank_handlers",
    "require_checkpoint",
    "verify_sha256",
]
