"""What a training step does when its loss is NaN / inf (``train.on_nonfinite``).

Under DeepSpeed fp16 the loss scaler handles it (it sees the overflowed gradients, skips the step and
lowers the scale), so the step goes on. Otherwise ``stop`` raises :class:`NonFiniteLossError` naming
the step and what to check, and ``skip`` drops the step's gradients and counts it, up to
``train.max_nonfinite_skips``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and train.on_nonfinite says to stop (or the skip budget ran out)."""


def handle_nonfinite(loss: float, *, step: int, train: Any, engine_kind: str, counters: dict[str, int]) -> bool:
    """True to go on with step ``step`` (1-based) anyway, False to skip it (``counters
    ["nonfinite_skips"]`` counts it); or raise :class:`NonFiniteLossError`. ``train``: the
    :class:`~vlscale.config.TrainConfig`."""
    if train.precision == "fp16" and engine_kind == "deepspeed":
        return True  # the loss scaler sees the inf/NaN gradients, skips and lowers the scale
    msg = (f"non-finite loss ({loss}) at step {step}: check lr (train.lr={train.lr}), "
           "precision, and the data of this batch")
    if train.on_nonfinite == "stop":
        raise NonFiniteLossError(msg + "; set train.on_nonfinite=skip to skip such steps")
    counters["nonfinite_skips"] += 1
    if counters["nonfinite_skips"] > train.max_nonfinite_skips:
        raise NonFiniteLossError(f"{msg}; {counters['nonfinite_skips']} steps skipped, more than "
                                 f"train.max_nonfinite_skips={train.max_nonfinite_skips}")
    log.warning("%s: step skipped (%d so far)", msg, counters["nonfinite_skips"])
    return False


__all__ = ["NonFiniteLossError", "handle_nonfinite"]
