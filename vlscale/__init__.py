"""vlscale: large-batch CLIP-style dual-encoder training on limited hardware.

Subpackages: ``loss`` (fused / chunked / reference contrastive loss, distributed),
``kernels`` (Triton kernels, installed from the top-level ``kernels/`` folder),
``gradcache`` (decoupled gradient accumulation), ``engines`` (DeepSpeed / FSDP2 / local
adapters), ``data`` (Arrow shards), ``model`` (dual encoder), ``train`` and ``eval``.
``vlscale.load(path)`` reads an exported model or a checkpoint (:mod:`vlscale.export`).
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:  # lazy: importing vlscale builds nothing
    if name == "load":
        from vlscale.export import load

        return load
    raise AttributeError(f"module 'vlscale' has no attribute {name!r}")
