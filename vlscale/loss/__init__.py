"""vlscale.loss: the contrastive losses (fused Triton, compiled / eager chunked torch, reference) and their backends.

``contrastive_loss`` (symmetric CLIP loss), ``info_nce`` (one direction, extra negatives),
``ContrastiveLoss`` (module form), ``get_backend`` (every registered impl: ``backends.registered_backends()``),
``precision`` (the 16-bit P policy and fp32-output matmuls). See :mod:`vlscale.loss.contrastive` for the math
and the seam the distributed loss plugs into.
"""

from vlscale.loss import precision
from vlscale.loss.backend import LossBackend, ReferenceBackend
from vlscale.loss.backends import get_backend
from vlscale.loss.chunked import ChunkedBackend
from vlscale.loss.compiled import CompiledChunkedBackend
from vlscale.loss.contrastive import (
    Comm,
    ContrastiveLoss,
    LocalComm,
    LossPlan,
    contrastive_loss,
    fused_loss,
    info_nce,
    one_way_plan,
    symmetric_plan,
)

__all__ = [
    "ChunkedBackend",
    "Comm",
    "CompiledChunkedBackend",
    "ContrastiveLoss",
    "LocalComm",
    "LossBackend",
    "LossPlan",
    "ReferenceBackend",
    "contrastive_loss",
    "fused_loss",
    "get_backend",
    "info_nce",
    "one_way_plan",
    "precision",
    "symmetric_plan",
]
