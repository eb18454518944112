"""Adaptive PromptNet of seed 000: contrast-free glioma grading guided by a frozen template."""
from models.promptnet.family import FAMILY, loss_config
from models.promptnet.loss import (
    PromptLossConfig,
    PromptNetCriterion,
    adaptive_weight,
    freeze_template,
    prompt_l1,
    promptnet_loss,
)
from models.promptnet.network import PromptNet, PromptNetOutput

__all__ = [
    "FAMILY",
    "PromptLossConfig",
    "PromptNet",
    "PromptNetCriterion",
    "PromptNetOutput",
    "adaptive_weight",
    "freeze_template",
    "loss_config",
    "prompt_l1",
    "promptnet_loss",
]
