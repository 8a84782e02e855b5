"""The distributed contrastive loss equals the single-process loss on the concatenated batch.

Each spawned run (gloo, CPU) batches many checks into one process group, because spawning costs
seconds per process on this machine. Every rank builds the same global batch from one seed, keeps
its slice, runs the distributed loss, and then does what the engine does to gradients (average
over ranks: embedding gradients scattered into a zero table and all-reduced, the logit-scale
gradient all-reduced, both divided by W). The result must equal a float64 single-process
reference written here with dense logits and autograd (independent of vlscale's own math).
"""

from __future__ import annotations

import importlib.util
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("vlscale.loss.contrastive")

from vlscale.loss.backend import ReferenceBackend
from vlscale.loss.comm import META_FIELDS
from vlscale.loss.contrastive import LocalComm, fused_loss, symmetric_plan

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# float64 oracle (dense logits, soft targets, autograd)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()


def _targets(labels: torch.Tensor, n: int, labels_b: torch.Tensor | None, lam: float) -> torch.Tensor:
    y = torch.zeros(labels.numel(), n, dtype=torch.float64)
    y[torch.arange(labels.numel()), labels] += lam if labels_b is not None else 1.0
    if labels_b is not None:
        y[torch.arange(labels.numel()), labels_b] += 1.0 - lam
    return y


def oracle_contrastive(img, txt, scale, labels_b=None, lam=1.0):
    img, txt, s = (t.detach().double().requires_grad_() for t in (img, txt, scale))
    logits = s * img @ txt.T
    y = _targets(torch.arange(img.shape[0]), txt.shape[0], labels_b, lam)
    loss = 0.5 * _soft_ce(logits, y) + 0.5 * _soft_ce(logits.T, y)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, s.grad


def oracle_info_nce(q, k, scale, labels, labels_b=None, lam=1.0, extra=None):
    q, k, s = (t.detach().double().requires_grad_() for t in (q, k, scale))
    keys = k if extra is None else torch.cat([k, extra.double()])
    loss = _soft_ce(s * q @ keys.T, _targets(labels, keys.shape[0], labels_b, lam))
    loss.backward()
    return loss.detach(), q.grad, k.grad, s.grad


# ----------------------------------------------------------------------------------------------
# what one spawned rank checks


@dataclass
class Case:
    name: str
    kind: str  # "clip" | "nce"
    rows: list[int]  # local rows per rank (queries / images)
    cols: list[int] | None = None  # local keys per rank (nce; None = rows)
    dim: int = 7
    scale: float = 9.0
    lam: float | None = None  # mixup weight; None = no mix
    labels: bool = False  # nce: explicit random global labels (else default)
    extra: int = 0  # nce: rows of a shared queue
    dtype: torch.dtype = torch.float32
    pipelined: bool = True  # False: gather the columns with one all-gather (the path above 16 ranks)
    key_grad: bool = True  # False: keys from a frozen / momentum tower (no reduce-scatter)
    via_api: bool = False  # call vlscale.loss.contrastive_loss / info_nce instead of the entry point
    impls: tuple[str, ...] = field(default=("reference",))


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: {"rtol": 2e-5, "atol": 2e-6}}.get(dtype, {"rtol": 2e-2, "atol": 2e-3})


def _close(what: str, got: torch.Tensor, want: torch.Tensor, tol: dict[str, float]) -> None:
    diff = (got.double() - want).abs()
    bound = tol["atol"] + tol["rtol"] * want.abs()
    if not bool((diff <= bound).all()):
        raise AssertionError(f"{what}: max diff {diff.max():.3e}, mean {diff.mean():.3e}, "
                             f"max |ref| {want.abs().max():.3e}")


def _engine_average(local_grad: torch.Tensor, offset: int, total: int, world: int) -> torch.Tensor:
    table = torch.zeros(total, local_grad.shape[1], dtype=torch.float64)
    table[offset : offset + local_grad.shape[0]] = local_grad.double()
    dist.all_reduce(table)
    return table / world


def _batch(case: Case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    cols = case.cols or case.rows
    m, n = sum(case.rows), sum(cols)
    q = torch.nn.functional.normalize(torch.randn(m, case.dim, generator=gen), dim=1).to(case.dtype)
    k = torch.nn.functional.normalize(torch.randn(n, case.dim, generator=gen), dim=1).to(case.dtype)
    extra = torch.randn(case.extra, case.dim, generator=gen).to(case.dtype) if case.extra else None
    labels = torch.randint(0, n, (m,), generator=gen) if case.labels else None
    labels_b = None
    if case.lam is not None:  # a permutation when square (ZeroVL's reversal is one), else any map
        labels_b = torch.randperm(n, generator=gen) if m == n else torch.randint(0, n, (m,), generator=gen)
    return q, k, extra, labels, labels_b


def _run_case(case: Case, impl: str, rank: int, world: int) -> None:
    from vlscale.loss import comm
    from vlscale.loss import contrastive as api
    from vlscale.loss.backends import get_backend
    from vlscale.loss.distributed import distributed_contrastive_loss, distributed_info_nce

    q, k, extra, labels, labels_b = _batch(case)
    cols = case.cols or case.rows
    qo, ko = sum(case.rows[:rank]), sum(cols[:rank])
    ql = q[qo : qo + case.rows[rank]].clone().requires_grad_()
    kl = k[ko : ko + cols[rank]].clone().requires_grad_(case.key_grad)
    scale = torch.tensor([case.scale], requires_grad=True)
    lam = case.lam if case.lam is not None else 1.0
    mix = None if labels_b is None else (labels_b[qo : qo + case.rows[rank]], lam)
    comm.PIPELINE_MAX_WORLD = 16 if case.pipelined else 0
    if case.kind == "clip":
        ref = oracle_contrastive(q, k, scale, labels_b, lam)
        if case.via_api:
            loss = api.contrastive_loss(ql, kl, scale, mix=mix, impl=impl, process_group=dist.group.WORLD)
        else:
            loss = distributed_contrastive_loss(ql, kl, scale, mix=mix, backend=get_backend(impl, ql.device),
                                                process_group=dist.group.WORLD)
    else:
        glabels = labels if labels is not None else torch.arange(sum(case.rows))
        ref = oracle_info_nce(q, k, scale, glabels, labels_b, lam, extra)
        mine = None if labels is None else labels[qo : qo + case.rows[rank]]
        kw = {"labels": mine, "mix": mix, "extra_keys": extra, "process_group": dist.group.WORLD}
        if case.via_api:
            loss = api.info_nce(ql, kl, scale, impl=impl, **kw)
        else:
            loss = distributed_info_nce(ql, kl, scale, backend=get_backend(impl, ql.device), **kw)
    loss.backward()
    tol, tag = _tol(case.dtype), f"[{case.name} impl={impl} rank={rank}/{world}]"
    _close(f"{tag} loss", loss.detach().reshape(()), ref[0], tol)
    _close(f"{tag} d/dq", _engine_average(ql.grad, qo, sum(case.rows), world), ref[1], tol)
    if case.key_grad:
        _close(f"{tag} d/dk", _engine_average(kl.grad, ko, sum(cols), world), ref[2], tol)
    ds = scale.grad.detach().double().clone()
    dist.all_reduce(ds)
    _close(f"{tag} d/dscale", ds / world, ref[3].reshape(ds.shape), tol)


def _expect_value_error(fn, match: str, tag: str) -> None:
    try:
        fn()
    except ValueError as err:
        if match not in str(err):
            raise AssertionError(f"{tag}: ValueError without {match!r}: {err}") from err
        return
    raise AssertionError(f"{tag}: no ValueError raised")


def _bad_inputs(rank: int) -> None:
    """Inconsistent inputs raise the same ValueError on every rank (no rank hangs in a collective)."""
    from vlscale.loss.distributed import distributed_contrastive_loss, distributed_info_nce

    b = ReferenceBackend()
    x = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    s = torch.tensor(5.0)
    queue = torch.randn(3, 6) + rank  # a per-rank queue: not allowed
    _expect_value_error(lambda: distributed_info_nce(x, x, s, extra_keys=queue, backend=b), "extra_keys differ", "queue")
    too_big = torch.full((4,), 4 * dist.get_world_size())
    _expect_value_error(lambda: distributed_info_nce(x, x, s, labels=too_big, backend=b), "GLOBAL", "labels range")
    lam = 0.5 if rank == 0 else 0.25
    _expect_value_error(lambda: distributed_contrastive_loss(x, x, s, mix=(torch.arange(4), lam), backend=b),
                        "mix lam differs", "lam mismatch")
    nan_on_one = x.clone()
    nan_on_one[0, 0] = float("nan") if rank == 1 else 0.0
    _expect_value_error(lambda: distributed_contrastive_loss(nan_on_one, x, s, backend=b), "rank(s) [1]", "NaN")
    own_scale = torch.tensor(5.0 + rank)
    _expect_value_error(lambda: distributed_contrastive_loss(x, x, own_scale, backend=b), "logit_scale", "scale")
    grad_on_one = x.clone().requires_grad_(rank == 0)
    _expect_value_error(lambda: distributed_contrastive_loss(grad_on_one, x, s, backend=b), "q_grad", "grad flags")
    dim = 6 if rank == 0 else 5
    y = torch.randn(4, dim)
    _expect_value_error(lambda: distributed_contrastive_loss(y, y, s, backend=b), "dimension D differs", "D")


def _no_grad_eval(rank: int, world: int) -> None:
    """Forward-only (validation) use: no backward, so no backward collectives; same global loss."""
    from vlscale.loss.distributed import distributed_contrastive_loss

    case = Case("eval-no-grad", "clip", [3, 5, 2, 4][:world])
    q, k, *_ = _batch(case)
    off, n = sum(case.rows[:rank]), case.rows[rank]
    with torch.no_grad():
        loss = distributed_contrastive_loss(q[off : off + n], k[off : off + n], torch.tensor(9.0),
                                            backend=ReferenceBackend())
    _close("[no_grad loss]", loss.reshape(()), oracle_contrastive(q, k, torch.tensor(9.0))[0], _tol(q.dtype))


def _count_bytes(case_dims: list[tuple[int, int]]) -> list[dict[str, int]]:
    """Run the symmetric loss at several (rows per rank, D), counting each collective's payload."""
    from vlscale.loss.distributed import distributed_contrastive_loss

    names = tuple(n for n in ("all_reduce", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
                              "reduce_scatter_single", "all_gather", "broadcast", "reduce", "all_to_all_single",
                              "send", "recv", "isend", "irecv") if hasattr(dist, n))
    originals = {n: getattr(dist, n) for n in names}
    log: dict[str, int] = {}
    depth: list[str] = []
    results = []

    def make(name):
        def counted(*args, **kwargs):
            # (out, in) signatures: count what this rank puts in
            payload = args[1] if name.startswith(("reduce_scatter_", "all_gather_")) else args[0]
            op = kwargs.get("op", dist.ReduceOp.SUM)
            key = name.replace("_into_tensor", "").replace("_single", "").replace("_tensor", "")
            if name == "all_reduce":
                key = f"all_reduce:{'max' if op == dist.ReduceOp.MAX else 'sum'}"
            if not depth:  # a renamed collective may call its old name: count the outer call only
                log[key] = log.get(key, 0) + payload.numel() * payload.element_size()
            depth.append(name)
            try:
                return originals[name](*args, **kwargs)
            finally:
                depth.pop()
        return counted

    try:
        for n in names:
            setattr(dist, n, make(n))
        for rows, dim in case_dims:
            log.clear()
            x = torch.nn.functional.normalize(torch.randn(rows, dim), dim=1).requires_grad_()
            y = torch.nn.functional.normalize(torch.randn(rows, dim), dim=1).requires_grad_()
            s = torch.tensor([3.0], requires_grad=True)
            distributed_contrastive_loss(x, y, s, backend=ReferenceBackend()).backward()
            results.append(dict(log))
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
    return results


def _check_bytes(world: int) -> None:
    runs = [(8, 4), (8, 64), (32, 4)]
    got = _count_bytes(runs)
    model = _load_script("comm_model")
    meta = 8 * len(META_FIELDS)  # one float64 vector per rank goes in
    for (rows, dim), log in zip(runs, got):
        n_global = rows * world
        tag = f"[bytes rows={rows} D={dim} W={world}]"
        # Column statistics: all-reduce MAX of N fp32 and SUM of N fp32 (+ two fp32 scalars); the
        # columns: one broadcast per owner; their gradient: one fp32 reduce-scatter; metadata.
        want = {"all_reduce:max": 4 * n_global, "all_reduce:sum": 4 * n_global + 4 + 4, "all_gather": meta,
                "broadcast": n_global * dim * 4, "reduce_scatter": n_global * dim * 4}
        assert log == want, (tag, log, want)
        assert log == model.vlscale_payload(rows, world, dim, 4), (tag, log, "benchmarks/comm_model.py")
    # The statistics exchange does not grow with D and grows linearly with N: O(B), not O(B·D).
    assert got[0]["all_reduce:max"] == got[1]["all_reduce:max"]
    assert got[2]["all_reduce:max"] == 4 * got[0]["all_reduce:max"]


def _worker(rank: int, world: int, port: int, cases: list[Case], extra_checks: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in cases:
            for impl in case.impls:
                _run_case(case, impl, rank, world)
        if extra_checks:
            _bad_inputs(rank)
            _no_grad_eval(rank, world)
            _check_bytes(world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world: int, port: int, cases: list[Case], extra_checks: bool = False) -> None:
    mp.spawn(_worker, args=(world, port, cases, extra_checks), nprocs=world, join=True)


def _available(impls: tuple[str, ...]) -> tuple[str, ...]:
    from vlscale.loss.backends import get_backend

    ok = []
    for impl in impls:
        try:
            get_backend(impl, torch.device("cpu"))
        except (ImportError, ValueError, RuntimeError, NotImplementedError):
            continue
        ok.append(impl)
    return tuple(ok)


# ----------------------------------------------------------------------------------------------
# the tests


class _LateWork:
    """Stands in for a broadcast that has not landed: the piece stays NaN until wait()."""

    def __init__(self, piece: torch.Tensor, data: torch.Tensor, log: list[int], src: int) -> None:
        self.piece, self.data, self.log, self.src = piece, data, log, src

    def wait(self) -> None:
        self.piece.copy_(self.data)
        self.log.append(self.src)


class _SliceComm(LocalComm):
    """One process playing a rank that owns columns [lo, hi): reduce_dk keeps only its slice."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def reduce_dk(self, dk_all: torch.Tensor) -> torch.Tensor:
        return dk_all[self.lo : self.hi]


def test_overlapped_gather_waits_for_each_piece_before_using_it() -> None:
    """The overlap wrapper computes the local block from the local tensor, then waits for each
    other rank's piece just before its block, and the core reads the gathered columns only after
    that: a NaN-filled buffer whose pieces land on wait() gives exactly the finished result."""
    from vlscale.loss.comm import PendingGather
    from vlscale.loss.distributed import _OverlappedGather

    torch.manual_seed(0)
    sizes, rank, d = [3, 4, 2], 1, 6  # this "rank" owns rows and columns 3..6 of 9
    n, lo = sum(sizes), sum(sizes[:rank])
    q = torch.randn(sizes[rank], d, requires_grad=True)
    k_all = torch.randn(n, d)
    s = torch.tensor(4.0, requires_grad=True)
    plan = symmetric_plan(sizes[rank], num_total=n, offset=lo)
    k_loc = k_all[lo : lo + sizes[rank]].clone().requires_grad_()
    comm = _SliceComm(lo, lo + sizes[rank])
    want = fused_loss(q, k_loc, s, plan, backend=ReferenceBackend(), k_all=k_all, comm=comm)
    want_grads = torch.autograd.grad(want, (q, k_loc, s))
    buffer = torch.full_like(k_all, float("nan"))
    landed: list[int] = []
    pending = PendingGather(buffer, sizes, [], pipelined=True)
    pending.works = [_LateWork(pending.piece(r), k_all[sum(sizes[:r]) : sum(sizes[: r + 1])], landed, r)
                     for r in range(len(sizes))]
    wrapped = _OverlappedGather(ReferenceBackend(), pending, k_loc, rank)
    got = fused_loss(q, k_loc, s, plan, backend=wrapped, k_all=buffer, comm=comm)
    got_grads = torch.autograd.grad(got, (q, k_loc, s))
    assert landed == [0, 2, 1]  # the other ranks' pieces in order, the own slot last (in the final wait)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _cases(impls: tuple[str, ...], world: int) -> list[Case]:
    even, uneven = [5] * world, [3, 6, 1, 4][:world]
    return [
        Case("clip-even", "clip", even, impls=impls),
        Case("clip-uneven-mix", "clip", uneven, lam=0.7, scale=30.0, impls=impls),
        Case("clip-uneven-allgather", "clip", uneven, lam=0.2, pipelined=False, impls=impls[:1]),
        Case("nce-queue-labels-mix", "nce", uneven, cols=[4, 2, 5, 3][:world], labels=True, extra=5,
             lam=0.35, impls=impls),
        Case("nce-default-labels", "nce", even, cols=[6] * world, impls=impls),
    ]


@pytest.mark.dist
def test_two_ranks_match_single_process(port: int) -> None:
    impls = _available(("reference", "chunked"))
    cases = [
        *_cases(impls, 2),
        Case("clip-api-mix", "clip", [4, 7], lam=0.4, via_api=True, impls=impls[-1:]),
        Case("nce-api", "nce", [4, 4], extra=3, via_api=True, impls=impls[-1:]),
        Case("clip-bf16", "clip", [6, 6], dim=16, dtype=torch.bfloat16, impls=impls[-1:]),
        Case("nce-frozen-keys", "nce", [3, 5], cols=[4, 4], extra=2, key_grad=False, impls=impls[:1]),
    ]
    _spawn(2, port, cases, extra_checks=True)


@pytest.mark.dist
@pytest.mark.slow  # four processes on a 2-core machine
def test_four_ranks_match_single_process(port: int) -> None:
    cases = {c.name: c for c in _cases(_available(("reference", "chunked")), 4)}
    _spawn(4, port, [cases["clip-uneven-mix"], cases["nce-queue-labels-mix"], cases["nce-default-labels"]])


@pytest.mark.dist
@pytest.mark.slow  # the Triton interpreter in two processes
def test_triton_two_ranks_match_single_process(port: int) -> None:
    if not _available(("triton",)):
        pytest.skip("the triton backend is not available here")
    cases = [Case("clip-triton", "clip", [5, 3], dim=16, lam=0.6, impls=("triton",)),
             Case("nce-triton", "nce", [4, 4], cols=[3, 5], dim=16, labels=True, extra=4, impls=("triton",))]
    _spawn(2, port, cases)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comm_model_orders_methods_and_keeps_statistics_o_of_b() -> None:
    model = _load_script("comm_model")
    for b, w in ((32768, 8), (1 << 20, 64)):
        total = {name: (lambda r: r["forward"] + r["backward"])(fn(b, w, 512, 2)) for name, fn in model.METHODS.items()}
        assert total["vlscale"] < total["open_clip"] < total["disco"] < total["infcl_ring"], total
    stats = [model.vlscale_bytes(b, 8, d, 2)["stats_exchange"] for b, d in ((4096, 64), (4096, 1024), (8192, 64))]
    assert stats[0] == stats[1] and stats[2] == 2 * stats[0]  # independent of D, linear in B


def test_bench_smoke_runs_on_cpu(tmp_path: Path) -> None:
    bench = _load_script("bench_distributed_loss")
    bench.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "distributed_loss_smoke.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"vlscale-chunked", "vlscale-reference-allgather", "openclip-local"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    assert (tmp_path / "distributed_loss_smoke.md").read_text().count("| ok |") == len(rows)
