"""What student and teacher training share: optimizer and schedule builders, and hooks.

Both trainers are built the same way (Pointcept's engine): a constructor that is a short list of
``build_*`` calls over one typed config, an explicit ``train_step``, and a loop that calls its
:class:`Hook` objects before training, after every step and at the end; logging, progress bars
and checkpoints are hooks, not code inside the loop.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from offline_training.config import OptimSection


def build_optimizer(params: Iterable[torch.nn.Parameter],
                    optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD with momentum, as ``optim`` says."""
    params = list(params)
    if optim.name == 'adamw':
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay)


def lr_factor(step: int, optim: OptimSection, steps: int) -> float:
    """Learning-rate factor at ``step`` of ``steps``: linear warm-up over
    ``optim.warmup_steps``, then constant or a cosine down to ``optim.min_lr_ratio``."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.scheduler == 'constant':
        return 1.0
    span = max(1, steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_ratio
    return float(floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection,
                    steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The :func:`lr_factor` schedule, stepped once per optimizer step."""
    def factor(step: int) -> float:   # a plain function: nothing of it goes into state_dict
        return lr_factor(step, optim, steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Hook:
    """Called by a trainer's loop: ``before_train``, ``after_step`` (with the step's loss
    values, ``trainer.step`` already counted), ``after_train`` (the loop finished) and
    ``close`` (always, also after an error)."""

    def before_train(self, trainer: Any) -> None:
        pass

    def after_step(self, trainer: Any, values: Mapping[str, float]) -> None:
        pass

    def after_train(self, trainer: Any) -> None:
        pass

    def close(self) -> None:
        pass


class ProgressHook(Hook):
    """A tqdm bar over ``trainer.config.steps`` showing the step's losses."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def before_train(self, trainer) -> None:
        from cmkd_ros.progress import progress_bar
        self.bar = progress_bar(trainer.config.steps, self.description, initial=trainer.step)

    def after_step(self, trainer, values) -> None:
        self.bar.update(1)
        self.bar.set_postfix({k: f'{v:.3f}' for k, v in values.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

