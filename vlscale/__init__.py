"""vlscale: large-batch CLIP-style dual-encoder training on limited hardware.

Subpackages: ``loss`` (fused / chunked / reference contrastive loss, distributed),
``kernels`` (Triton kernels, installed from the top-level ``kernels/`` folder),
``gradcache`` (decoupled gradient accumulation), ``engines`` (DeepSpeed / FSDP2 / local
adapters), ``data`` (Arrow shards), ``model`` (dual encoder), ``train`` and ``eval``.
"""

__version__ = "0.1.0"
