"""vlscale.model: the CLIP-style dual encoder (timm vision tower + transformers text tower).

``DualEncoder(ModelConfig(...))`` → ``model(pixels=, tokens=, attention_mask=) -> dict``;
``build_tokenizer(cfg)``; ``param_groups(model, weight_decay)`` for the optimizer.

Names are imported on first use (PEP 562): ``vlscale.model.config`` / ``hier_key`` stay cheap
for code that only needs the config (recipes, the loss side of the techniques), while timm and
transformers load with the first ``DualEncoder`` / tokenizer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlscale.model.config import ModelConfig, hier_key
    from vlscale.model.dual_encoder import DualEncoder
    from vlscale.model.optim import param_groups
    from vlscale.model.tokenizer import build_tokenizer, load_tokenizer, word_tokenizer

_EXPORTS = {
    "ModelConfig": "vlscale.model.config",
    "hier_key": "vlscale.model.config",
    "DualEncoder": "vlscale.model.dual_encoder",
    "param_groups": "vlscale.model.optim",
    "build_tokenizer": "vlscale.model.tokenizer",
    "load_tokenizer": "vlscale.model.tokenizer",
    "word_tokenizer": "vlscale.model.tokenizer",
}

__all__ = ["DualEncoder", "ModelConfig", "build_tokenizer", "hier_key", "load_tokenizer", "param_groups",
           "word_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlscale.model' has no attribute {name!r}")
