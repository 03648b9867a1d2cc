"""DLRM's dense part: bottom MLP, pairwise dot interaction, top MLP.

The model takes the embedding vectors already looked up, so the lookup (local or sharded
across workers by the router) stays outside and only this dense part is wrapped in DDP.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
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


class DLRMConfig(BaseModel):
    """Shape of a DLRM (Naumov et al., 2019) as MLPerf trains it on Criteo.

    Args:
        kind: discriminator in a job config (`model: {kind: dlrm, ...}`).
        num_dense: dense (integer) features, already transformed (log1p).
        num_sparse: categorical features, one embedding vector each.
        embedding_dim: d, the width of every embedding vector.
        bottom_mlp: layer widths of the MLP over the dense features; the last must be d,
            because its output takes part in the dot interaction with the embeddings.
        top_mlp: layer widths of the MLP over the interaction; the last must be 1 (the logit).
        first_order: add a first-order (wide) term: one scalar weight per id, summed over
            the features into the logit. It is stored as one more column of each feature's
            embedding (`table_dim` = d + 1), so it goes through the same compressed method,
            sharding, collapse and serving, and its bytes are counted with the tables.
        first_order_scale: factor on the summed scalars. The scalars start at the tables'
            init scale (U(±1/√(d+1)), summed over 26 features: a logit noise of ~0.7) and
            move by ~lr per step under Adagrad; 0.1 measured best on the real Kaggle rows
            (validation AUC 0.720 against 0.707 at 1.0 and 0.706 at 0.02).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dlrm"] = "dlrm"
    num_dense: int = Field(13, ge=1)
    num_sparse: int = Field(26, ge=1)
    embedding_dim: int = Field(16, ge=1)
    bottom_mlp: list[int] = Field(default_factory=lambda: [64, 16], min_length=1)
    top_mlp: list[int] = Field(default_factory=lambda: [64, 32, 1], min_length=1)
    first_order: bool = False
    first_order_scale: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> DLRMConfig:
        if self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(
                f"bottom_mlp must end in embedding_dim={self.embedding_dim} (got "
                f"{self.bottom_mlp[-1]}): its output is dotted with the embedding vectors"
            )
        if self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1, the logit (got {self.top_mlp[-1]})")
        if min(self.bottom_mlp + self.top_mlp) < 1:
            raise ValueError("every MLP layer needs a positive width")
        return self

    @property
    def table_dim(self) -> int:
        """Width of each looked-up vector: d, plus the first-order scalar when on."""
        return self.embedding_dim + int(self.first_order)

    @property
    def num_interactions(self) -> int:
        """Pairwise dot products among the bottom output and the embeddings (no diagonal)."""
        vectors = self.num_sparse + 1
        return vectors * (vectors - 1) // 2

    def build(self) -> DLRM:
        """A freshly initialised model of this shape (seed torch beforehand to reproduce)."""
        return DLRM(self)


class DLRM(nn.Module):
    """forward(dense [n, num_dense] float, embedded [n, num_sparse, d]) -> logits [n].

    Args:
        config: the shape.
    """

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__()
        self.config = config
        self.bottom = mlp(config.num_dense, config.bottom_mlp, final_activation=True)
        self.top = mlp(
            config.embedding_dim + config.num_interactions, config.top_mlp, final_activation=False
        )
        rows, cols = torch.triu_indices(config.num_sparse + 1, config.num_sparse + 1, offset=1)
        # A buffer so the indices follow the module to its device; not part of a checkpoint.
        self.register_buffer("_pairs", rows * (config.num_sparse + 1) + cols, persistent=False)

    def interact(self, bottom: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Upper triangle (no diagonal) of the Gram matrix of [bottom, e_1..e_F], then bottom.

        Args:
            bottom: [n, d] output of the bottom MLP.
            embedded: [n, F, d] embedding vectors.
        """
        vectors = torch.cat([bottom.unsqueeze(1), embedded], dim=1)
        gram = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)
        return torch.cat([bottom, gram[:, self._pairs]], dim=1)

    def forward(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        c = self.config
        vectors, wide = split_first_order(embedded, c.num_sparse, c.embedding_dim, c.first_order,
                                          c.first_order_scale)
        bottom = self.bottom(dense)
        logit = self.top(self.interact(bottom, vectors.to(bottom.dtype))).squeeze(1)
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
