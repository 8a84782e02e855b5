"""Projection heads: tower width → the shared embedding space (before L2 normalisation)."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``"linear"``: one bias-free linear map (CLIP). ``"mlp"``: Linear–GELU–Linear (width → width → E).

    ``pre_norm`` puts a LayerNorm first: intermediate-layer features (hierarchical alignment) come
    straight out of a residual stream, without the tower's final norm."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", *, pre_norm: bool = False) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"projection head kind must be 'linear' or 'mlp', got {kind!r}")
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if pre_norm else []
        if kind == "linear":
            layers.append(nn.Linear(in_dim, out_dim, bias=False))
        else:
            layers += [nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim)]
        self.net = nn.Sequential(*layers)
        self._init(in_dim)

    def _init(self, in_dim: int) -> None:
        # CLIP's projection init: std = width^-0.5 keeps the output scale independent of the width.
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=in_dim**-0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
