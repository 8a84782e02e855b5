"""Typed run configuration: one dataclass per section, named recipes, ``key.sub=value`` overrides.

A run is a recipe from ``launch/`` (``tiny-cpu``, ``zerovl-v100``, ``fsdp2``, or a path to a JSON /
TOML file) plus a few overrides such as ``train.lr=1e-3``. Every field is typed and documented;
``__post_init__`` rejects bad values with a ``ValueError`` naming the field, and unknown keys are
rejected with the closest known names. The resolved config is written into the run directory
(:func:`save_config`) and read back by ``vlscale eval`` and ``--resume`` (:func:`config_from_dict`);
parsing, recipes and saving live in :mod:`vlscale.config_io` and are re-exported here.

The model section is :class:`vlscale.model.ModelConfig` (owned by the model part); it is imported
lazily so that ``vlscale.config`` can be read without building any model code.
The DeepSpeed JSON is generated from this config by :func:`to_deepspeed_config`
(in :mod:`vlscale.train.dsconfig`, re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlscale.config_data import DataConfig, _check  # the data section lives there (re-exported)

RECIPE_DIR = Path(__file__).resolve().parents[1] / "launch" / "recipes"

Precision = Literal["fp32", "fp16", "bf16"]


@dataclass
class TrainConfig:
    """Optimisation, batch sizes, precision, logging and checkpoint cadence."""

    run_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints/."""
    steps: int = 1000
    """Number of optimizer steps."""
    global_batch_size: int = 256
    """Contrastive batch over all ranks: every pair sees global_batch_size - 1 negatives."""
    micro_batch_size: int = 0
    """Per-rank batch per optimizer step (0 = global_batch_size / world size)."""
    grad_accum_steps: int = 1
    """DeepSpeed gradient_accumulation_steps. Must stay 1: the gradient cache already splits the
    batch into chunks, and accumulating separate contrastive batches would shrink the negatives."""
    lr: float = 5e-4
    """Peak learning rate of AdamW (reached after warmup)."""
    min_lr_ratio: float = 0.0
    """Cosine schedule floor as a fraction of ``lr``."""
    warmup_steps: int = 100
    """Linear warmup from 0 to ``lr`` over this many steps."""
    weight_decay: float = 0.2
    """AdamW decoupled weight decay; never applied to biases, norms, embeddings, logit_scale."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2 (0.98 as in CLIP: large-batch contrastive training)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    precision: Precision = "fp32"
    """Tower arithmetic: fp32, fp16 (dynamic loss scaling) or bf16. The loss is always fp32."""
    seed: int = 0
    """Seed for model init, data order and dropout (each rank offsets it by its rank)."""
    log_every: int = 10
    """Write metrics every N steps."""
    eval_every: int = 0
    """Zero-shot retrieval on data.eval_shards every N steps and at the last step (0 = none during
    training: run ``vlscale eval`` on a checkpoint)."""
    ckpt_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep (older ones are deleted)."""
    init_from: str = ""
    """Start from the weights of a checkpoint folder, a run dir (its latest checkpoint), a
    ``vlscale export`` folder or a weights file — weights only: step 0, a fresh optimizer and
    schedule, any world size and engine ('' = random init; ``--resume`` wins over it)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """What a NaN/inf loss does: stop the run with a message, or skip that step (counted)."""
    max_nonfinite_skips: int = 10
    """With on_nonfinite='skip': stop after this many skipped steps in total."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    tensorboard: bool = True
    """Also write TensorBoard events next to metrics.jsonl."""
    memory_phase_steps: int = 3
    """Record each phase's peak memory (embed / loss / reforward / step) over this many steps after
    the first into memory.json, for ``vlscale memory report`` (0 = off; later steps pay nothing)."""
    memory_backend: Literal["auto", "rss", "tensors"] = "auto"
    """How those phases are measured: auto = the CUDA allocator on GPU, sampled RSS on CPU;
    tensors = exact live tensor bytes (a Python hook per op: small models only)."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "log_every", "grad_accum_steps", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "warmup_steps", "eval_every", "ckpt_every", "max_nonfinite_skips",
                     "memory_phase_steps"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "train.beta1/beta2",
               f"must be in [0, 1), got {self.beta1}, {self.beta2}")
        _check(self.eps > 0, "train.eps", f"must be > 0, got {self.eps}")
        _check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.grad_accum_steps == 1, "train.grad_accum_steps",
               "must be 1: grow the contrastive batch with global_batch_size and let the gradient "
               f"cache chunk it (got {self.grad_accum_steps})")


@dataclass
class LossConfig:
    """Which contrastive-loss implementation runs (see vlscale.loss)."""

    impl: Literal["auto", "triton", "triton-banded", "triton-fused", "compiled", "chunked", "reference"] = "auto"
    """auto = Triton on sm_80+, the compiled chunked tile on other GPUs (eager chunked when it does not
    compile), chunked on CPU; the names are vlscale.loss.backends.registered_backends(); naming one
    that cannot run is an error."""


@dataclass
class GradCacheConfig:
    """Decoupled gradient accumulation (ZeroVL): embed in chunks, one loss, re-forward per chunk."""

    enabled: bool = True
    """Off = one plain forward/backward over the whole per-rank batch (the reference path)."""
    chunk_size: int = 256
    """Pairs per re-forward chunk: bounds activation memory independently of the batch."""
    image_chunk_size: int = 0
    """Chunk size for the image tower only (0 = chunk_size)."""
    text_chunk_size: int = 0
    """Chunk size for the text tower only (0 = chunk_size)."""

    def __post_init__(self) -> None:
        _check(self.chunk_size >= 1, "gradcache.chunk_size", f"must be >= 1, got {self.chunk_size}")
        for name in ("image_chunk_size", "text_chunk_size"):
            _check(getattr(self, name) >= 0, f"gradcache.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class EngineConfig:
    """What wraps the single-device model: plain torch, DeepSpeed ZeRO, or torch FSDP2."""

    kind: Literal["local", "deepspeed", "fsdp"] = "local"
    """local = one process or plain DDP-style all-reduce; deepspeed = ZeRO; fsdp = fully_shard."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (only with kind='deepspeed')."""
    ds_config: str = ""
    """Path to a user's own DeepSpeed JSON (also ``--deepspeed_config``): it wins for what it sets, this
    config fills the rest, each conflict is logged ('' = generate one; see vlscale.train.launchers)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend (auto = nccl on CUDA, else gloo)."""

    def __post_init__(self) -> None:
        _check(0 <= self.zero_stage <= 3, "engine.zero_stage", f"must be 0..3, got {self.zero_stage}")
        _check(self.kind == "deepspeed" or (self.zero_stage == 0 and not self.ds_config), "engine",
               f"zero_stage / ds_config only apply to kind='deepspeed' (kind={self.kind!r})")


@dataclass
class TechniquesConfig:
    """Switches and weights of the paper techniques (see vlscale.techniques and docs/techniques.md)."""

    contrastive_weight: float = 1.0
    """Weight of the in-batch symmetric contrastive loss (0 = leave it out, e.g. BriVL's momentum-only
    objective; some other term must then be on)."""
    mixup: bool = False
    """ZeroVL coin-flipping mixup (pixels or text embeddings, soft targets per term)."""
    mixup_alpha: float = 0.1
    """Beta(alpha, alpha) parameter of the mixup coefficient (ZeroVL: 0.1)."""
    momentum_queue: int = 0
    """WenLan cross-modal momentum contrast: queue length K (0 = off)."""
    momentum: float = 0.99
    """EMA coefficient of the momentum towers (BriVL: 0.99; ViCHA: 0.995)."""
    momentum_candidates: Literal["batch_queue", "positive_queue"] = "batch_queue"
    """Candidates per query: the batch's momentum keys + the queue (B + K; MoCo / ALBEF / ViCHA), or
    BriVL's exact 1 + K (the query's own positive + the queue)."""
    momentum_weight: float = 1.0
    """Weight of the momentum-contrast term ½·(image→text + text→image)."""
    hier_weight: float | list[float] = 0.0
    """ViCHA hierarchical alignment: one weight for every intermediate level, or one per level
    (ViCHA: 0.1 × [1, 1, 1, 1, 1]); 0 = off."""
    concept_prob: float = 0.0
    """ViCHA visual concepts: probability of keeping each of an image's concepts at training
    (ViCHA samples 30%: ``randkw_p: 0.3``); evaluation feeds all of them (image_tokens mode)."""
    concept_mode: Literal["caption", "image_tokens"] = "caption"
    """Where sampled concepts go: appended to the caption (text side), or ViCHA's way — encoded by the
    text tower and given to the image tower as extra tokens (needs model.concept_tokens > 0)."""
    max_concepts: int = 8
    """At most this many sampled concepts per image at training."""
    mim_weight: float = 0.0
    """ViCHA masked image modeling: weight of the per-chunk MAE loss (ViCHA: 1; 0 = off; needs
    model.mim_decoder_depth > 0 and a timm ViT)."""
    mim_mask_ratio: float = 0.75
    """Fraction of patches removed for masked image modeling (ViCHA / MAE: 0.75)."""
    mim_norm_pix: bool = True
    """Reconstruct per-patch normalised pixels (MAE's norm_pix_loss, as ViCHA)."""

    def __post_init__(self) -> None:
        _check(self.mixup_alpha > 0, "techniques.mixup_alpha", f"must be > 0, got {self.mixup_alpha}")
        _check(self.momentum_queue >= 0, "techniques.momentum_queue", f"must be >= 0, got {self.momentum_queue}")
        _check(0.0 <= self.momentum < 1.0, "techniques.momentum", f"must be in [0, 1), got {self.momentum}")
        weights = self.hier_weight if isinstance(self.hier_weight, list) else [self.hier_weight]
        _check(all(w >= 0 for w in weights), "techniques.hier_weight", f"must be >= 0, got {self.hier_weight}")
        _check(0.0 <= self.concept_prob <= 1.0, "techniques.concept_prob", f"must be in [0, 1], got {self.concept_prob}")
        for name in ("contrastive_weight", "momentum_weight", "mim_weight"):
            _check(getattr(self, name) >= 0, f"techniques.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.max_concepts >= 1, "techniques.max_concepts", f"must be >= 1, got {self.max_concepts}")
        _check(0.0 < self.mim_mask_ratio < 1.0, "techniques.mim_mask_ratio", f"must be in (0, 1), got {self.mim_mask_ratio}")

    @property
    def hier_on(self) -> bool:
        """Hierarchical alignment is on (some level weight > 0)."""
        weights = self.hier_weight if isinstance(self.hier_weight, list) else [self.hier_weight]
        return any(w > 0 for w in weights)


def _check_techniques(cfg: Config) -> None:
    """Technique switches that need the model built for them (checked before anything is built)."""
    t, m = cfg.techniques, cfg.model
    _check(not t.hier_on or m.n_hier > 0, "techniques.hier_weight",
           "> 0 needs model.hier_levels (or hier_image_layers / hier_text_layers)")
    if isinstance(t.hier_weight, list) and t.hier_on:
        _check(len(t.hier_weight) == m.n_hier, "techniques.hier_weight",
               f"has {len(t.hier_weight)} weights for {m.n_hier} hierarchical levels")
    _check((t.concept_mode == "image_tokens") == (m.concept_tokens > 0), "techniques.concept_mode",
           f"={t.concept_mode!r} needs model.concept_tokens {'> 0' if t.concept_mode == 'image_tokens' else '= 0'} "
           f"(got {m.concept_tokens})")
    _check(t.mim_weight == 0 or m.mim_decoder_depth > 0, "techniques.mim_weight",
           "> 0 needs model.mim_decoder_depth > 0")
    on = t.contrastive_weight > 0 or (t.momentum_queue and t.momentum_weight > 0)
    _check(bool(on), "techniques.contrastive_weight", "is 0 and no momentum term is on: nothing to train")


@dataclass
class EvalConfig:
    """Zero-shot retrieval evaluation (during training and in ``vlscale eval``)."""

    batch_size: int = 64
    """Rows (image–caption pairs) per embedding batch."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Recall@k values reported for image→text and text→image."""
    chunk: int = 1024
    """Queries scored per block, each against every candidate at once (chunk × N scores in memory,
    never N × N); the results do not depend on it, ties included."""
    max_batches: int = 0
    """Evaluate on at most this many loader batches of batch_size rows (0 = the whole set)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.chunk >= 1, "eval.chunk", f"must be >= 1, got {self.chunk}")
        _check(self.max_batches >= 0, "eval.max_batches", f"must be >= 0, got {self.max_batches}")
        _check(bool(self.ks) and all(k >= 1 for k in self.ks), "eval.ks", f"must be positive ints, got {self.ks}")


def model_config_class() -> type:
    """vlscale.model.ModelConfig (imported lazily: the model part owns it)."""
    from vlscale.model.config import ModelConfig

    return ModelConfig


@dataclass
class Config:
    """A whole run. ``model`` is a vlscale.model.ModelConfig."""

    model: Any = None
    """The dual encoder (vlscale.model.ModelConfig); None = that class's defaults."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gradcache: GradCacheConfig = field(default_factory=GradCacheConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    techniques: TechniquesConfig = field(default_factory=TechniquesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = ""
    """Name or path of the recipe this config came from (informational)."""

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = model_config_class()()
        _check(self.engine.kind == "deepspeed" or self.train.precision != "fp16", "train.precision",
               "fp16 needs dynamic loss scaling, which only engine.kind='deepspeed' provides; use bf16 or fp32")
        _check_techniques(self)


# Parsing / recipes / saving live in vlscale.config_io (kept apart to keep this file about the fields).
from vlscale.config_io import (  # noqa: E402  (config_io needs the classes above)
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    load_recipe,
    model_config_from_dict,
    recipe_path,
    save_config,
)

__all__ = [
    "RECIPE_DIR",
    "Config",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "GradCacheConfig",
    "LossConfig",
    "Precision",
    "TechniquesConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_recipe",
    "model_config_class",
    "model_config_from_dict",
    "recipe_path",
    "save_config",
]


def __getattr__(name: str) -> Any:
    # to_deepspeed_config lives in vlscale.train.dsconfig (batch arithmetic + user JSON checks);
    # re-exported lazily so that importing the config never imports the trainer.
    if name == "to_deepspeed_config":
        from vlscale.train import dsconfig

        return dsconfig.to_deepspeed_config
    raise AttributeError(name)
