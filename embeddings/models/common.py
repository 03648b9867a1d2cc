"""What the CTR models' dense parts share: the input shape, the first-order (wide) term and
the MLP builder, so DLRM and DCN differ only in how they combine their inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


def mlp(in_features: int, sizes: list[int], final_activation: bool) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last one when asked).

    Args:
        in_features: width of the input.
        sizes: output width of each layer.
        final_activation: whether the last layer is followed by a ReLU too.
    """
    layers: list[nn.Module] = []
    for i, size in enumerate(sizes):
        layers.append(nn.Linear(in_features, size))
        if i < len(sizes) - 1 or final_activation:
            layers.append(nn.ReLU())
        in_features = size
    return nn.Sequential(*layers)


class CTRModelConfig(BaseModel):
    """The input every model takes. A model's config adds its own layers, then declares
    `first_order` and `first_order_scale` itself: fields declared here come first in a dump,
    and model.json has always listed those two last.

    Args:
        kind: discriminator in a job config (`model: {kind: dlrm, ...}`).
        num_dense: dense (integer) features, already transformed (log1p).
        num_sparse: categorical features, one embedding vector each.
        embedding_dim: d, the width of every embedding vector.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    num_dense: int = Field(13, ge=1)
    num_sparse: int = Field(26, ge=1)
    embedding_dim: int = Field(16, ge=1)
    if TYPE_CHECKING:
        first_order: bool
        first_order_scale: float

    @property
    def table_dim(self) -> int:
        """Width of each looked-up vector: d, plus the first-order scalar when on."""
        return self.embedding_dim + int(self.first_order)


class CTRModel(nn.Module):
    """forward(dense [n, num_dense] float, embedded [n, num_sparse, table_dim]) -> logits [n].

    The first-order scalars (when on) are split off the lookup and their scaled sum added to
    the logit; the dense features go through `bottom`; `logit` is the model's own part.

    Args:
        config: the shape.
    """

    bottom: nn.Module

    def __init__(self, config: CTRModelConfig) -> None:
        super().__init__()
        self.config = config

    def logit(self, bottom: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """[n] logits from the bottom's output and the [n, F, d] embedding vectors."""
        raise NotImplementedError

    def forward(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        c = self.config
        vectors, wide = split_first_order(embedded, c.num_sparse, c.embedding_dim, c.first_order,
                                          c.first_order_scale)
        bottom = self.bottom(dense)
        logit = self.logit(bottom, vectors.to(bottom.dtype))
        return logit if wide is None else logit + wide.to(logit.dtype)


def split_first_order(
    embedded: torch.Tensor, num_sparse: int, dim: int, first_order: bool, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([n, F, d] vectors, [n] sum of the first-order scalars or None) from the lookup.

    Args:
        embedded: [n, F, d] or, with the first-order term, [n, F, d + 1] (scalar last).
        num_sparse: F.
        dim: d.
        first_order: whether the last column is the per-id scalar.
        scale: factor on the sum of the scalars.
    """
    width = dim + int(first_order)
    if embedded.shape[1:] != (num_sparse, width):
        raise ValueError(
            f"embedded must be [n, {num_sparse}, {width}], got {list(embedded.shape)}"
            + (" (d + 1: the first-order scalar is the last column)" if first_order else "")
        )
    if not first_order:
        return embedded, None
    return embedded[..., :dim], embedded[..., dim].sum(1) * scale
