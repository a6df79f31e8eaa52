"""Ignite event handlers: checkpoints (atomic saves, safe loading), run state for resume, the non-finite loss guard,
self-training rounds, pre-trained initialisation, progress lines, per-term gradient norms and learning curves."""

from medcl.handlers.checkpoint_loader import SafeCheckpointLoader
from medcl.handlers.checkpoint_saver import AtomicCheckpointSaver
from medcl.handlers.grad_norms import TermGradNormHandler
from medcl.handlers.learning_curve import LearningCurveWriter, read_learning_curve
from medcl.handlers.loss_guard import NonFiniteLossError, NonFiniteLossGuard
from medcl.handlers.pretrained_loader import PretrainedLoader
from medcl.handlers.progress import ProgressHandler
from medcl.handlers.run_lock import RunDirLock
from medcl.handlers.run_state import RunStateHandler, register_run_state, run_state_path
from medcl.handlers.self_training import SelfTrainingHandler, round_of_epoch, total_epochs

__all__ = [
    "AtomicCheckpointSaver",
    "LearningCurveWriter",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PretrainedLoader",
    "read_learning_curve",
    "ProgressHandler",
    "register_run_state",
    "round_of_epoch",
    "run_state_path",
    "RunDirLock",
    "RunStateHandler",
    "SafeCheckpointLoader",
    "SelfTrainingHandler",
    "TermGradNormHandler",
    "total_epochs",
]
