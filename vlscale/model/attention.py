"""Which attention kernel the two towers use, chosen once per model and logged.

* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math
  kernels picked by torch). The default everywhere, and the only fused option on CPU.
* ``eager`` — the towers' explicit softmax(QKᵀ)V (for debugging and as a reference).
* ``xformers`` — ``xformers.ops.memory_efficient_attention`` (CUDA only). ``auto`` picks it only
  on CUDA devices older than sm_80 (V100), where torch's SDPA has no flash kernel and the
  xformers CUTLASS kernel is the faster one; on sm_80+ SDPA's flash kernel is at least as fast.

timm: every ``timm.layers.Attention`` has a ``fused_attn`` flag (SDPA vs eager); for xformers
its class is swapped to a subclass whose forward runs xformers (same parameters, other kernel).
transformers: the text tower is built with ``attn_implementation=`` ``"sdpa"`` / ``"eager"`` or
``"vlscale_xformers"``, an attention function registered here with transformers'
``AttentionInterface`` (masks built as for SDPA).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

log = logging.getLogger(__name__)

HF_XFORMERS = "vlscale_xformers"


def xformers_available() -> bool:
    """xformers is importable (it is only usable with CUDA tensors)."""
    return importlib.util.find_spec("xformers") is not None


def resolve_attn_impl(requested: str) -> str:
    """Turn ``"auto"`` into a concrete implementation; refuse ``"xformers"`` where it cannot run."""
    if requested in ("sdpa", "eager"):
        return requested
    cuda = torch.cuda.is_available()
    if requested == "xformers":
        if not cuda:
            raise ValueError("attn_impl='xformers' needs a CUDA device (xformers has no CPU kernels); "
                             "use 'sdpa' or 'auto'")
        if not xformers_available():
            raise ValueError("attn_impl='xformers' but xformers is not installed (pip install xformers)")
        return "xformers"
    if requested != "auto":
        raise ValueError(f"unknown attn_impl {requested!r}")
    if cuda and xformers_available() and torch.cuda.get_device_capability()[0] < 8:
        return "xformers"
    return "sdpa"


def _memory_efficient_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float,
                                scale: float | None) -> Tensor:
    """xformers kernel on (B, L, H, D) tensors. Imported lazily: xformers is optional."""
    import xformers.ops as xops

    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=scale)


def _bool_mask_to_bias(mask: Tensor | None, q: Tensor, n_heads: int) -> Tensor | None:
    """SDPA-style mask (bool: True = attend, or additive float) → additive bias (B, H, Lq, Lk).

    xformers wants a dense bias whose last dimension is stored 8-aligned: allocate padded, slice."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    b, lq, lk = q.shape[0], mask.shape[-2], mask.shape[-1]
    padded = torch.empty(b, n_heads, lq, (lk + 7) // 8 * 8, dtype=q.dtype, device=q.device)
    bias = padded[..., :lk]
    bias.copy_(mask.to(q.dtype).expand(b, n_heads, lq, lk))
    return bias


def hf_xformers_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: object) -> tuple[Tensor, None]:
    """transformers attention function: (B, H, L, D) inputs → (B, L, H, D) output, like SDPA's."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    bias = _bool_mask_to_bias(attention_mask, q, q.shape[2])
    out = _memory_efficient_attention(q, k, v, bias, dropout, scaling)
    return out.contiguous(), None


def register_hf_xformers() -> None:
    """Make ``attn_implementation="vlscale_xformers"`` available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_XFORMERS, hf_xformers_attention)
    if HF_XFORMERS not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(HF_XFORMERS, sdpa_mask)


def hf_attn_implementation(impl: str) -> str:
    """The ``attn_implementation`` string transformers needs for ``impl``."""
    if impl == "xformers":
        register_hf_xformers()
        return HF_XFORMERS
    return impl


def _xformers_timm_forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None,
                           is_causal: bool = False) -> Tensor:
    """``timm.layers.Attention.forward`` with the xformers kernel (same parameters, same math)."""
    if is_causal:
        raise ValueError("xformers timm attention: causal attention is not supported")
    b, n, _ = x.shape
    # getattr: gate / norm / attn_dim are newer than some timm 1.0.x releases (the GPU image's).
    gate_layer = getattr(self, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv.unbind(2)  # (B, N, H, D): xformers' layout, no transpose needed
    q, k = self.q_norm(q), self.k_norm(k)
    bias = _bool_mask_to_bias(attn_mask, q, self.num_heads)
    p = self.attn_drop.p if self.training else 0.0
    x = _memory_efficient_attention(q, k, v, bias, p, self.scale).reshape(b, n, attn_dim)
    norm = getattr(self, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


# Subclass of timm's Attention so isinstance() checks elsewhere still hold.
_XformersAttention = type("_XformersAttention", (Attention,), {"forward": _xformers_timm_forward})


def apply_timm_attention(model: nn.Module, impl: str) -> int:
    """Set the attention kernel of every ``timm.layers.Attention`` in ``model``; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) in (Attention, _XformersAttention):
            if impl == "xformers":
                module.__class__ = _XformersAttention
            else:
                module.__class__ = Attention
                module.fused_attn = impl == "sdpa"
            count += 1
    return count


def reference_attention(q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor | None = None, p: float = 0.0,
                        scale: float | None = None) -> Tensor:
    """SDPA with xformers' (B, L, H, D) calling convention: the stand-in kernel tests use on CPU."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_bias, dropout_p=p, scale=scale)
    return out.transpose(1, 2)
