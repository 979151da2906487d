"""Post-training: tasks with exact verifiers and rewards, the GRPO loss variants, SFT data,
evaluation with a report card, and distillation by rejection sampling. See docs/posttrain.md."""

from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.grpo import GRPOConfig, group_advantages, policy_loss
from nanoseek.posttrain.tasks import TASKS, Problem, Reward, Task, get_task

__all__ = [
    "PostTrainError",
    "GRPOConfig",
    "group_advantages",
    "policy_loss",
    "TASKS",
    "Problem",
    "Reward",
    "Task",
    "get_task",
]
