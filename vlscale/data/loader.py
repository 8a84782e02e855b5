"""``build_loader`` and ``ShardLoader``: the resumable, epoch-aware loader the training loop uses.

``ShardLoader`` wraps a ``torch.utils.data.DataLoader`` (``batch_size=None``; batches are made
in the workers). Iterating it runs the rest of the current epoch; when a pass ends, the epoch
advances. Its state is, per logical worker, the stream positions after the last batch the
training loop actually received (batches still in the prefetch queue are not counted), plus the
worker the round-robin visits next — enough to resume with exactly the batches an uninterrupted
run would have produced, in the same order. ``stats`` sums the workers' skip counts.

With ``part_size`` the loader yields parts (``parts_per_step`` of them make one step of this rank;
the trainer assembles them, :mod:`vlscale.train.assemble`); a checkpoint is taken between steps,
so the saved position is always at a step boundary.

RNG isolation: a DataLoader iterator draws its workers' base seed from ``generator`` (the global
torch RNG when none is given), so creating one would shift the trainer's dropout / mixup draws
after a resume. Each pass gets its own generator seeded from (seed, epoch, rank): iterating the
loader never reads or advances the global torch RNG.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlscale.data.collate import ZEROVL_TEXT_MASK_SPLIT, Batch, CaptionMasker
from vlscale.data.dataset import ShardDataset, seed_worker_threads
from vlscale.data.fs import StorageOptions
from vlscale.data.stream import ShardIndex, default_rank_world
from vlscale.data.transforms import build_transform

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: debiased positions follow the global schedule (version 1 resumes mixed mode only)
_LOADER_SALT = 0xD17A  # keeps the workers' base seed apart from the shuffle / augmentation seeds


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The private CPU generator of one pass: a pure function of (seed, epoch, rank)."""
    (state,) = np.random.SeedSequence([seed, epoch, rank, _LOADER_SALT]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state) >> 1)  # 63 bits: manual_seed takes any int64


class ShardLoader:
    """Iterate ``Batch`` objects; ``state_dict()`` / ``load_state_dict()`` resume exactly."""

    def __init__(self, dataset: ShardDataset, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2) -> None:
        if num_workers < 0 or prefetch_factor <= 0:
            raise ValueError(f"num_workers ({num_workers}) must be >= 0 and prefetch_factor ({prefetch_factor}) > 0")
        self.dataset = dataset
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.epoch = 0
        self._worker_states: dict[int, dict] = {}
        self._next_worker = 0
        self._base_stats: Counter = Counter({"unreadable_shard": len(dataset.index.skipped)})
        self._live_stats: dict[int, dict] = {}

    @property
    def logical_workers(self) -> int:
        return max(1, self.num_workers)

    def __len__(self) -> int:
        """Units (batches, or parts) per epoch on this rank (exact unless samples are skipped, then
        an upper bound)."""
        return self.dataset.batches_per_epoch(self.logical_workers)

    @property
    def parts_per_step(self) -> int:
        """Consecutive units that make one step (1 without ``part_size``)."""
        return self.dataset.parts_per_step

    def steps_per_epoch(self) -> int:
        """Steps per epoch on this rank (a short last group of parts is a step)."""
        return self.dataset.steps_per_epoch(self.logical_workers)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration."""
        self._fold_stats()
        self.epoch, self._worker_states, self._next_worker = int(epoch), {}, 0

    def _fold_stats(self) -> None:
        for counts in self._live_stats.values():
            self._base_stats.update(counts)
        self._live_stats = {}

    @property
    def stats(self) -> dict[str, int]:
        """Counts since the start of training: ``samples`` delivered, skips by reason
        (``unreadable_image``, ``empty_caption``, ``unreadable_batch``, ``unreadable_shard``),
        ``dropped_tail`` (rows left at an epoch's end that could not fill a batch with
        ``drop_last``, counted once by the rank that owns them) and ``short_batch`` (debiased
        batches that skipped samples left shorter than ``batch_size``), and remote I/O of the
        workers (``io_requests``, ``io_bytes``, ``io_retries``, ``io_cache_hits``)."""
        total = Counter(self._base_stats)
        for counts in self._live_stats.values():
            total.update(counts)
        return dict(total)

    def __iter__(self) -> Iterator[Batch]:
        self._fold_stats()
        self.dataset.configure(epoch=self.epoch, worker_states=self._worker_states,
                               worker_offset=self._next_worker, num_workers=self.logical_workers)
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "worker_init_fn": seed_worker_threads}
        # Own generator: the DataLoader iterator draws its base seed from it, not the global RNG.
        gen = loader_generator(self.dataset.seed, self.epoch, self.dataset.rank)
        dl = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                        pin_memory=self.pin_memory, generator=gen, **kwargs)
        for batch in dl:
            self._worker_states[batch.worker] = batch.state
            self._live_stats[batch.worker] = batch.stats
            self._next_worker = (batch.worker + 1) % self.logical_workers
            if isinstance(batch, Batch):  # EndOfStream only carries bookkeeping
                yield batch
        self._fold_stats()
        self.epoch, self._worker_states, self._next_worker = self.epoch + 1, {}, 0

    def _fingerprint(self) -> dict:
        ds = self.dataset
        return {"num_workers": self.logical_workers, "world_size": ds.world_size, "rank": ds.rank, "seed": ds.seed,
                "batch_size": ds.batch_size, "num_rows": ds.index.num_rows, "debiased": ds.debiased,
                "drop_last": ds.drop_last, "shuffle_buffer": ds.shuffle_buffer, "part_size": ds.part_size}

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank's stream (save it with the checkpoint)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "next_worker": self._next_worker,
                "worker_states": {str(w): s for w, s in self._worker_states.items()},
                "stats": self.stats, "config": self._fingerprint()}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from ``state_dict()``; the partition settings must match (else ``ValueError``)."""
        version = state.get("version")
        if version != STATE_VERSION and not (version == 1 and not self.dataset.debiased):
            raise ValueError(f"loader state version {version} != {STATE_VERSION}" + (
                " (a debiased checkpoint of an older vlscale: its per-worker schedule cannot be continued by "
                "the global one; restart the epoch with loader.set_epoch)" if version == 1 else ""))
        saved = {"part_size": 0, **state["config"]}  # checkpoints from before data.part_size: whole batches
        mismatched = {k: (v, saved.get(k)) for k, v in self._fingerprint().items() if saved.get(k) != v}
        if mismatched:
            raise ValueError("cannot resume exactly: loader settings differ from the checkpoint "
                             f"(name: (now, saved)) {mismatched}")
        self.epoch, self._next_worker = int(state["epoch"]), int(state["next_worker"])
        self._worker_states = {int(w): dict(s) for w, s in state["worker_states"].items()}
        self._base_stats, self._live_stats = Counter(state.get("stats", {})), {}


def build_loader(shards: str | Path | list[str | Path], *, tokenizer: Callable | None = None,
                 image_size: int | tuple[int, int] | None = 224, data_config: Mapping | None = None,
                 train: bool = True, batch_size: int = 64, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0, seed: int = 0, debiased: bool = False, shuffle: bool | None = None,
                 shuffle_buffer: int = 1024, drop_last: bool | None = None, max_length: int = 77,
                 on_error: str = "raise", pin_memory: bool | None = None, prefetch_factor: int = 2, part_size: int = 0,
                 with_concepts: bool | None = None, scale: tuple[float, float] = (0.9, 1.0),
                 hflip: float = 0.0, draft: bool | None = None, auto_augment: str = "",
                 text_mask_prob: float = 0.0,
                 text_mask_split: tuple[float, float, float] = ZEROVL_TEXT_MASK_SPLIT,
                 storage: StorageOptions | None = None, pixel_dtype: str = "float32") -> ShardLoader:
    """Build the loader over a shard folder or a list of shard files.

    ``train`` selects the random-resized-crop transform, shuffling and ``drop_last`` (each
    overridable). ``rank``/``world_size`` default to torch.distributed (or RANK/WORLD_SIZE).
    ``debiased``: ZeroVL sampling, one source per global step (``vlscale.data.sampling``).
    Train-time augmentation (``train=True`` only): crop area ``scale``, ``hflip``,
    ``auto_augment`` (``transforms.parse_auto_augment``) and ZeroVL caption token masking
    ``text_mask_prob`` / ``text_mask_split`` (``collate.CaptionMasker``; the tokenizer must have a
    mask token).
    ``on_error="skip"`` skips unreadable shards / record batches and counts them instead of raising.
    ``pin_memory`` defaults to whether CUDA is available (checked here, not at import).
    ``draft`` (reduced-scale JPEG decoding of large images) defaults to ``train``.
    ``pixel_dtype``: ``"float32"`` batches hold normalised pixels; ``"uint8"`` the decoded values
    (a quarter of the host memory), normalised by the consumer with the transform's mean / std
    (``loader.dataset.transform``; the trainer does it on the device: :mod:`vlscale.train.pixels`).
    ``part_size`` (a divisor of ``batch_size``; 0 = whole batches): the loader yields parts of that
    many rows, ``batch_size / part_size`` consecutive ones per step (:mod:`vlscale.data.dataset`).
    ``shards`` may be URLs (``s3://``, ``gs://``, ``hf://`` …); ``storage`` sets their retries,
    read-ahead and local cache (:class:`vlscale.data.fs.StorageOptions`).
    """
    if rank is None or world_size is None:
        auto_rank, auto_world = default_rank_world()
        rank = auto_rank if rank is None else rank
        world_size = auto_world if world_size is None else world_size
    if not train and (auto_augment or text_mask_prob):
        raise ValueError("auto_augment and text_mask_prob are train-time augmentations; build_loader(train=False) "
                         "was asked for them")
    masker = CaptionMasker.from_tokenizer(tokenizer, text_mask_prob, text_mask_split) if text_mask_prob else None
    index = ShardIndex(shards, on_error=on_error, storage=storage)
    for path, why in index.skipped.items():
        log.warning("skipping shard %s: %s", path, why)
    transform = build_transform(train=train, image_size=image_size, data_config=data_config, scale=scale,
                                hflip=hflip, draft=draft, auto_augment=auto_augment)
    dataset = ShardDataset(
        index, batch_size=batch_size, transform=transform, tokenizer=tokenizer, max_length=max_length, rank=rank,
        world_size=world_size, seed=seed, shuffle=train if shuffle is None else shuffle,
        shuffle_buffer=shuffle_buffer, drop_last=train if drop_last is None else drop_last, debiased=debiased,
        on_error=on_error, with_concepts=any(index.has_concepts) if with_concepts is None else with_concepts,
        caption_masker=masker, pixel_dtype=pixel_dtype, part_size=part_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return ShardLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
