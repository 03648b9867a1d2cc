"""DLRM's dense part: bottom MLP, pairwise dot interaction, top MLP.

The model takes the embedding vectors already looked up, so the lookup (local or sharded
across workers by the router) stays outside and only this dense part is wrapped in DDP.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from embeddings.models.common import CTRModel, CTRModelConfig, mlp


class DLRMConfig(CTRModelConfig):
    """Shape of a DLRM (Naumov et al., 2019) as MLPerf trains it on Criteo.

    Args (besides the input's, `CTRModelConfig`):
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

    kind: Literal["dlrm"] = "dlrm"
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
    def num_interactions(self) -> int:
        """Pairwise dot products among the bottom output and the embeddings (no diagonal)."""
        vectors = self.num_sparse + 1
        return vectors * (vectors - 1) // 2

    def build(self) -> DLRM:
        """A freshly initialised model of this shape (seed torch beforehand to reproduce)."""
        return DLRM(self)


class DLRM(CTRModel):
    """forward(dense [n, num_dense] float, embedded [n, num_sparse, d]) -> logits [n].

    Args:
        config: the shape.
    """

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__(config)
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

    def logit(self, bottom: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return self.top(self.interact(bottom, vectors)).squeeze(1)
