"""vlscale.model: the CLIP-style dual encoder (timm vision tower + transformers text tower).

``DualEncoder(ModelConfig(...))`` → ``model(pixels=, tokens=, attention_mask=) -> dict``;
``build_tokenizer(cfg)``; ``param_groups(model, weight_decay)`` for the optimizer.
"""

from vlscale.model.config import ModelConfig
from vlscale.model.dual_encoder import DualEncoder, hier_key
from vlscale.model.optim import param_groups
from vlscale.model.tokenizer import build_tokenizer, load_tokenizer, word_tokenizer

__all__ = ["DualEncoder", "ModelConfig", "build_tokenizer", "hier_key", "load_tokenizer", "param_groups",
           "word_tokenizer"]
