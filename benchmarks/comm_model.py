"""Communication volume per training step of four distributed contrastive losses (a model, CPU only).

Bytes each rank SENDS for one forward + backward of the symmetric loss, B pairs in total over W
ranks, embedding dimension D, embeddings of ``e`` bytes per element. Collectives are costed as
NCCL's ring algorithms move data: an all-gather or a reduce-scatter of a total of X bytes sends
(W−1)/W·X per rank, an all-reduce 2·(W−1)/W·X, a point-to-point ring step its message size. The
parameter all-reduce of the towers (the same for every method) is not counted.

vlscale (:mod:`vlscale.loss.distributed`)
    forward: metadata all-gather (13 float64), texts gathered by W broadcasts up to 16 ranks (on a
    ring each rank sends (W−1)/W·B·D·e, as in an all-gather of B·D·e), column log-sum-exp merge
    (all-reduce MAX + SUM of B fp32), loss all-reduce (1 fp32); mixup adds a labels all-gather
    (B int64); backward: reduce-scatter of the text gradient in fp32 (B·D·4), scale gradient
    all-reduce (1 fp32). The column statistics exchange is the only B-sized part besides the
    gather: O(B), independent of D.
open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``
    forward: all-gather of images and texts (``torch.distributed.nn.all_gather``); backward: its
    gradient is a reduce-scatter of both (in the embedding dtype). Each rank holds 2·(B/W)·B logits.
DisCo-CLIP (``disco.Gather``, IDEA-Research/DisCo-CLIP)
    forward: all-gather of images and texts without autograd; backward: ``all_reduce(AVG)`` of the
    full gathered gradient of both (2·B·D·e each), of which each rank keeps its slice.
Inf-CL ring (``inf_cl.cal_ring_loss``, one call per direction)
    forward: W−1 ring steps passing the key block, cast to fp32 (B/W·D·4 each); backward: W−1 steps
    passing keys again plus W steps passing the fp32 key-gradient accumulator; ×2 for the two
    directions. No rank holds all embeddings, but the keys cross the ring three times per direction.

``python benchmarks/comm_model.py`` writes ``benchmarks/results/comm_model.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlscale.loss.comm import META_FIELDS, PIPELINE_MAX_WORLD

RESULTS = Path(__file__).resolve().parent / "results"
META_BYTES = 8 * len(META_FIELDS)  # vlscale's per-rank metadata vector (float64)


def _ag(total: float, w: int) -> float:
    """Bytes one rank sends in a ring all-gather (or reduce-scatter) of ``total`` bytes."""
    return (w - 1) / w * total


def _ar(total: float, w: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``total`` bytes."""
    return 2 * (w - 1) / w * total


def vlscale_payload(rows: int, w: int, d: int, e: int, *, mix: bool = False) -> dict[str, int]:
    """Bytes this rank PUTS INTO each collective (what a test counts by wrapping the calls)."""
    n = rows * w
    out = {
        "all_gather": META_BYTES + (rows * 8 if mix else 0),
        "broadcast": n * d * e,  # the columns: one broadcast per owner (W ≤ 16), buffer = all N rows
        "all_reduce:max": 4 * n,
        "all_reduce:sum": 4 * n + 4 + 4,  # exp-shifted column sums, loss value, scale gradient
        "reduce_scatter": n * d * 4,
    }
    return out


def vlscale_bytes(b: int, w: int, d: int, e: int, *, mix: bool = False) -> dict[str, float]:
    stats = 2 * _ar(4 * b, w)
    scalars = 2 * _ar(4, w)
    fwd = _ag(META_BYTES * w, w) + _ag(b * d * e, w) + (_ag(8 * b, w) if mix else 0) + stats + scalars / 2
    bwd = _ag(b * d * 4, w) + scalars / 2
    gather_calls = w if w <= PIPELINE_MAX_WORLD else 1  # one broadcast per owner, or one all-gather
    return {"forward": fwd, "backward": bwd, "stats_exchange": stats, "collectives": 6 + gather_calls + int(mix)}


def open_clip_bytes(b: int, w: int, d: int, e: int) -> dict[str, float]:
    return {"forward": 2 * _ag(b * d * e, w), "backward": 2 * _ag(b * d * e, w), "stats_exchange": 0.0,
            "collectives": 4}


def disco_bytes(b: int, w: int, d: int, e: int) -> dict[str, float]:
    return {"forward": 2 * _ag(b * d * e, w), "backward": 2 * _ar(b * d * e, w), "stats_exchange": 0.0,
            "collectives": 4}


def infcl_ring_bytes(b: int, w: int, d: int, e: int) -> dict[str, float]:
    block = b / w * d * 4  # Inf-CL casts q and k to fp32 before the ring
    per_direction_fwd = (w - 1) * block
    per_direction_bwd = (w - 1) * block + w * block
    return {"forward": 2 * per_direction_fwd, "backward": 2 * per_direction_bwd + _ar(4, w),
            "stats_exchange": 0.0, "collectives": 2 * ((w - 1) + (2 * w - 1)) + 1}


def loss_memory(method: str, b: int, w: int, d: int, e: int) -> float:
    """Bytes the loss itself holds per rank beyond the local embeddings (dominant terms)."""
    local = b // w
    if method == "vlscale":  # gathered texts + fp32 gradient of all columns + O(B) statistics
        return b * d * e + b * d * 4 + 4 * (2 * b + 2 * local)
    if method in ("open_clip", "disco"):  # both sides gathered + 2 logit blocks and their gradients
        return 2 * b * d * e + 2 * 2 * local * b * 4
    if method == "infcl_ring":  # fp32 copies of q, k, one block in flight, dq, dk accumulators
        return 6 * local * d * 4 + 4 * local
    raise ValueError(f"unknown method {method!r}")


METHODS = {"vlscale": vlscale_bytes, "open_clip": open_clip_bytes, "disco": disco_bytes,
           "infcl_ring": infcl_ring_bytes}


def table(sizes: list[int], worlds: list[int], d: int, e: int) -> list[dict[str, object]]:
    rows = []
    for b in sizes:
        for w in worlds:
            for name, fn in METHODS.items():
                r = fn(b, w, d, e)
                rows.append({"method": name, "B": b, "W": w, "D": d, "bytes_per_elem": e,
                             "forward_bytes": r["forward"], "backward_bytes": r["backward"],
                             "total_bytes": r["forward"] + r["backward"],
                             "stats_exchange_bytes": r["stats_exchange"], "collective_calls": r["collectives"],
                             "loss_memory_bytes": loss_memory(name, b, w, d, e)})
    return rows


def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def markdown(rows: list[dict[str, object]], d: int, e: int) -> str:
    lines = [
        "# Communication volume per step of distributed contrastive losses (model)",
        "",
        f"Bytes SENT per rank for one forward + backward of the symmetric loss; D={d}, embeddings "
        f"{e} bytes/element (bf16), gradients as each method sends them (vlscale and Inf-CL: fp32). "
        "Ring costs: all-gather / reduce-scatter (W−1)/W·X, all-reduce 2(W−1)/W·X. Generated by "
        "`python benchmarks/comm_model.py`; formulas in its docstring. `stats` = vlscale's column "
        "log-sum-exp exchange (O(B), independent of D). `loss mem` = what the loss holds per rank "
        "beyond the local embeddings (gathered embeddings, logits, gradient buffers).",
        "",
        "| B | W | method | fwd MiB | bwd MiB | total MiB | stats MiB | calls | loss mem MiB |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']:,} | {r['W']} | {r['method']} | {_mib(r['forward_bytes'])} | {_mib(r['backward_bytes'])} "
            f"| {_mib(r['total_bytes'])} | {_mib(r['stats_exchange_bytes'])} | {r['collective_calls']} "
            f"| {_mib(r['loss_memory_bytes'])} |"
        )
    lines += [
        "",
        "Reading it: vlscale moves one side's embeddings out (gather, e bytes) and one side's "
        "gradient back (reduce-scatter, fp32) plus 2·B fp32 of statistics; open_clip's local loss "
        "moves both sides both ways; DisCo-CLIP replaces the reduce-scatter by an all-reduce (2×); "
        "Inf-CL's ring passes fp32 keys three times per direction but never holds all embeddings "
        "(its memory column is the smallest). Sending the gradient in fp32 costs vlscale 2× over a "
        "bf16 reduce-scatter; it keeps the sum over ranks exact to fp32.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32768,262144,1048576", help="global batch sizes B")
    p.add_argument("--worlds", default="8,64", help="numbers of ranks W")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--bytes-per-elem", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    rows = table([int(x) for x in a.sizes.split(",")], [int(x) for x in a.worlds.split(",")], a.dim,
                 a.bytes_per_elem)
    a.out.mkdir(parents=True, exist_ok=True)
    config = {"sizes": a.sizes, "worlds": a.worlds, "dim": a.dim, "bytes_per_elem": a.bytes_per_elem}
    (a.out / "comm_model.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1) + "\n")
    (a.out / "comm_model.md").write_text(markdown(rows, a.dim, a.bytes_per_elem))
    print(markdown(rows, a.dim, a.bytes_per_elem))


if __name__ == "__main__":
    main()
