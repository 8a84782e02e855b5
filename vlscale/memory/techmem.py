"""The techniques' extra memory (docs/memory.md): what momentum contrast, ViCHA's hierarchical heads
and masked image modeling add to a rank, as components of :func:`vlscale.memory.model.predict_memory`.

* **Momentum contrast** (WenLan / BriVL; :mod:`vlscale.techniques.momentum`): a plain fp32 copy of the
  dual encoder on every rank (4·Ψ_m bytes, whole even under ZeRO-3 / FSDP2) and two queues of K × E
  fp32 keys, live in every phase; this step's keys (2·b·E·4) from the key pass until the enqueue
  after the optimizer step; the key pass itself (phase ``keys``, before ``embed``) — the EMA update,
  one whole fp32 master parameter at a time, then the keys encoded chunk by chunk without a graph.
  Its loss terms (two directions, each over the keys and the queue) replace or join the symmetric
  loss in the ``loss`` phase (:mod:`vlscale.memory.lossmem`).
* **Hierarchical alignment** (ViCHA): n more embeddings per tower, their pieces and gradients, and n
  more symmetric loss terms. The heads' parameters and activations are in the meta-device count.
* **Masked image modeling** (ViCHA): the MIM forward of each image chunk — the encoder on the kept
  patches and the decoder on all of them — runs in that chunk's ``reforward`` beside its ordinary
  forward (the per-chunk loss hook), so its activations add to the chunk's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vlscale.memory.lossmem import SYMMETRIC, LossTerm

CANDIDATES = ("batch_queue", "positive_queue")  # vlscale.techniques.momentum.CANDIDATES
ALWAYS = ("keys", "embed", "loss", "reforward", "fwd_bwd", "step")


@dataclass(frozen=True)
class TechniqueMemory:
    """What the recipe's techniques change in a rank's memory (the default: the plain symmetric loss)."""

    contrastive: bool = True
    """The symmetric contrastive term is computed (``techniques.contrastive_weight > 0``)."""
    hier_levels: int = 0
    """ViCHA hierarchical levels with a weight > 0: each one more embedding per tower and one more term."""
    momentum_params: int = 0
    """Parameters of the fp32 momentum copy Ψ_m (0: no momentum contrast)."""
    queue_size: int = 0
    """Momentum queue length K (two queues: image and text keys)."""
    candidates: str = "batch_queue"
    """"batch_queue": the global batch's keys are gathered (B + K candidates); "positive_queue": 1 + K."""
    ema_transient_bytes: float = 0.0
    """The EMA update's largest temporary: one whole fp32 master parameter (0 when the engine's
    parameters are the fp32 masters themselves: the local engine)."""
    mim_act_bytes_per_row: float = 0.0
    """Activations of one image's masked-image-modeling forward + loss (0: MIM off)."""

    def __post_init__(self) -> None:
        if self.candidates not in CANDIDATES:
            raise ValueError(f"momentum candidates must be one of {CANDIDATES}, got {self.candidates!r}")
        if min(self.hier_levels, self.momentum_params, self.queue_size) < 0 or \
                min(self.ema_transient_bytes, self.mim_act_bytes_per_row) < 0:
            raise ValueError(f"technique memory inputs must be >= 0, got {self}")
        if not (self.contrastive or self.hier_levels or self.momentum_params):
            raise ValueError("no loss term: the symmetric loss, a hierarchical level or momentum contrast is needed")

    @property
    def momentum(self) -> bool:
        return self.momentum_params > 0

    @property
    def embeddings_per_tower(self) -> int:
        """Embeddings each tower hands to the loss: the final one and one per hierarchical level."""
        return 1 + self.hier_levels

    def loss_terms(self) -> tuple[LossTerm, ...]:
        terms = [SYMMETRIC] if self.contrastive else []
        terms += [LossTerm(f"hierarchical {i}") for i in range(self.hier_levels)]
        if self.momentum:
            cols = "keys" if self.candidates == "batch_queue" else "local"
            terms += [LossTerm(f"momentum {way}", columns=cols, column_grads=False, column_stats=False,
                               queue=self.queue_size, directions=1) for way in ("i2t", "t2i")]
        return tuple(terms)

    def components(self, *, b_local: int, rows: int, d: int, nograd_per_row: float,
                   reforward_rows: int) -> dict[str, tuple[float, tuple[str, ...]]]:
        """Extra components → (bytes, phases live in). ``rows``: one chunk (key pass);
        ``reforward_rows``: rows whose MIM forward runs at once (a chunk, or the whole local batch)."""
        out: dict[str, tuple[float, tuple[str, ...]]] = {}
        if self.momentum:
            keys = 2.0 * b_local * d * 4
            # Encoding the text keys ends with the image keys, the text pieces and their concatenation.
            encode = b_local * d * 4 + rows * nograd_per_row
            out.update({
                "momentum copy": (4.0 * self.momentum_params, ALWAYS),
                "momentum queues": (2.0 * self.queue_size * d * 4, ALWAYS),
                "momentum keys": (keys, ALWAYS),
                # The EMA update runs first and frees its temporary before the keys are encoded.
                "momentum key pass": (max(self.ema_transient_bytes, encode), ("keys",)),
            })
        if self.mim_act_bytes_per_row:
            out["MIM forward"] = (reforward_rows * self.mim_act_bytes_per_row, ("reforward", "fwd_bwd"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
