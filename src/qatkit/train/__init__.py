"""Training: `fit` (float or QAT models, distillation, exact resume), `evaluate`, and checkpoint files."""
from qatkit.train.checkpoint import load_checkpoint, save_checkpoint
from qatkit.train.loop import evaluate, fit

__all__ = ["evaluate", "fit", "load_checkpoint", "save_checkpoint"]
