"""DCNv2's dense part: a cross network (full or low-rank) and a deep network, stacked or parallel.

Like DLRM it takes the embedding vectors already looked up, so the sharded lookup stays
outside and only this part is wrapped in DDP (Wang et al., 2021, "DCN V2").
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from embeddings.models.common import CTRModel, CTRModelConfig, mlp


class DCNStructure(str, Enum):
    """How the cross and deep networks are combined."""

    STACKED = "stacked"  # deep(cross(x0)): the deep network refines the crossed features
    PARALLEL = "parallel"  # [cross(x0), deep(x0)]: both see the raw input, a linear head joins


class DCNConfig(CTRModelConfig):
    """Shape of a DCNv2.

    The input x0 is the dense part (raw, or through `bottom_mlp` as MLPerf's DLRM-DCNv2 does)
    concatenated with the flattened embeddings. Each cross layer computes
    x_{l+1} = x0 * (W x_l + b) + x_l, with W = U V^T of rank `cross_rank` when given.
    A final linear layer maps the last width to one logit.

    Args (besides the input's, `CTRModelConfig`):
        bottom_mlp: layer widths of an MLP over the dense features before concatenation;
            empty feeds them raw, as in the DCNv2 paper.
        cross_layers: number of cross layers (0 leaves only the deep network).
        cross_rank: rank r of each cross layer's W = U V^T (None = full D×D matrix). Low rank
            is what keeps W affordable when D = 26·d is large.
        deep_mlp: hidden widths of the deep network (ReLU after each); the logit layer follows.
        structure: stacked or parallel.
        first_order: add a first-order (wide) term: one scalar weight per id, summed over
            the features into the logit, stored as one more embedding column (`table_dim`
            = d + 1) so it is compressed, sharded, collapsed and served with the tables.
        first_order_scale: factor on the summed scalars (see `DLRMConfig`).
    """

    kind: Literal["dcn"] = "dcn"
    bottom_mlp: list[int] = Field(default_factory=list)
    cross_layers: int = Field(3, ge=0)
    cross_rank: int | None = Field(None, ge=1)
    deep_mlp: list[int] = Field(default_factory=lambda: [64, 32])
    structure: DCNStructure = DCNStructure.STACKED
    first_order: bool = False
    first_order_scale: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> DCNConfig:
        if self.bottom_mlp + self.deep_mlp and min(self.bottom_mlp + self.deep_mlp) < 1:
            raise ValueError("every MLP layer needs a positive width")
        if self.cross_layers == 0 and not self.deep_mlp:
            raise ValueError("a DCN needs cross layers, a deep network, or both")
        return self

    @property
    def input_dim(self) -> int:
        """Width D of x0: the dense part plus every embedding vector."""
        dense = self.bottom_mlp[-1] if self.bottom_mlp else self.num_dense
        return dense + self.num_sparse * self.embedding_dim

    def build(self) -> DCN:
        """A freshly initialised model of this shape (seed torch beforehand to reproduce)."""
        return DCN(self)


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l, with W full or U V^T of rank `rank`.

    Args:
        dim: width D of x0 and x_l.
        rank: rank of W, or None for a full matrix.
    """

    def __init__(self, dim: int, rank: int | None) -> None:
        super().__init__()
        if rank is None:
            self.weight: nn.Module = nn.Linear(dim, dim)
        else:
            self.weight = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))
        # As TorchRec does: a zero bias and Xavier kernels keep x0 * (W x + b) small at start,
        # so each layer begins near the identity (the residual) and the stack trains stably.
        for m in self.weight.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.weight(x) + x


class DCN(CTRModel):
    """forward(dense [n, num_dense] float, embedded [n, num_sparse, d]) -> logits [n].

    Args:
        config: the shape.
    """

    def __init__(self, config: DCNConfig) -> None:
        super().__init__(config)
        self.bottom = (
            mlp(config.num_dense, config.bottom_mlp, final_activation=True)
            if config.bottom_mlp
            else nn.Identity()
        )
        width = config.input_dim
        self.cross = nn.ModuleList(
            CrossLayer(width, config.cross_rank) for _ in range(config.cross_layers)
        )
        self.deep = (
            mlp(width, config.deep_mlp, final_activation=True) if config.deep_mlp else nn.Identity()
        )
        deep_out = config.deep_mlp[-1] if config.deep_mlp else width
        if config.structure is DCNStructure.PARALLEL and config.cross_layers and config.deep_mlp:
            head_in = width + deep_out
        else:
            head_in = deep_out
        self.head = nn.Linear(head_in, 1)

    def logit(self, bottom: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        c = self.config
        x0 = torch.cat([bottom, vectors.flatten(1)], dim=1)
        crossed = x0
        for layer in self.cross:
            crossed = layer(x0, crossed)
        if c.structure is DCNStructure.STACKED or not c.cross_layers or not c.deep_mlp:
            out = self.deep(crossed)
        else:
            out = torch.cat([crossed, self.deep(x0)], dim=1)
        return self.head(out).squeeze(1)
