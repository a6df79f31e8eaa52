"""Workflow pieces the bundles share: inferers, distributed set-up, checkpoint helpers."""

from medcl.workflows.checkpoints import AtomicCheckpointSaver, SafeCheckpointLoader, expected_sha256, file_sha256, require_checkpoint, verify_sha256
from medcl.workflows.distributed import ddp_device, init_process_group, is_rank0, rank_handlers
from medcl.workflows.inferers import volume_inferer
from medcl.workflows.pretrained import PretrainedLoader, load_pretrained
from medcl.workflows.overrides import check_cli_overrides
from medcl.workflows.pseudo_labels import PseudoLabeler, confidence_filter, crf_refine, pseudo_label_dice
from medcl.workflows.localcl_step import LocalCLStep
from medcl.workflows.self_training import SelfTrainingHandler, round_of_epoch, total_epochs
from medcl.workflows.loss_guard import NonFiniteLossError, NonFiniteLossGuard
from medcl.workflows.pretrain_trainer import PretrainTrainer
from medcl.workflows.resume import RunStateHandler, run_state_path
