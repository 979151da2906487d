"""The one error type of the post-training stage."""

from __future__ import annotations


class PostTrainError(ValueError):
    """A post-training problem the user can fix (bad SFT data, unknown task, bad loss
    setting); the message names the problem and the fix, and the CLI prints it as one line."""
