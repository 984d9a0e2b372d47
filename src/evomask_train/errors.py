"""How a pretraining run stops early: one exception family, one exit status per kind.

Every early end of :func:`evomask_train.train.train` is a :class:`TrainingStopped`; ``main`` prints
its message in one line and exits with its ``exit_code``. The checkpoints written before are
untouched, so the run can be resumed once the cause is fixed.
"""

from __future__ import annotations

__all__ = ["TrainingStopped", "NonFiniteError", "TrainingInterrupted"]


class TrainingStopped(RuntimeError):
    """The run stopped on a fault it can explain (divergence, an unwritable output folder, bad data).

    ``main`` prints the message and exits with status 3 instead of a traceback.
    """

    exit_code = 3


class NonFiniteError(TrainingStopped, FloatingPointError):
    """The loss, the gradients or the masking attention turned NaN/Inf: the step was not taken."""


class TrainingInterrupted(TrainingStopped):
    """Ctrl-C or SIGTERM (a cluster's pre-emption): a checkpoint was written if training had begun.
    Exit status 130, the shell's for an interrupted command."""

    exit_code = 130
