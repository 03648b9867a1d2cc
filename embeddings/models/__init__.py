"""CTR models (DLRM, DCNv2): the dense part that sits on top of the embedding lookup.

Every model maps (dense [n, 13] float, embedded [n, 26, d]) to logits [n]; the lookup that
makes `embedded` (local or sharded) is separate, so DDP wraps only these modules.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from embeddings.models.dcn import DCN, DCNConfig, DCNStructure
from embeddings.models.dlrm import DLRM, DLRMConfig
from embeddings.models.presets import PRESETS, model_preset

# A job config's `model:` field: pydantic picks the class from `kind`.
ModelConfig = Annotated[DLRMConfig | DCNConfig, Field(discriminator="kind")]


def build_model(config: DLRMConfig | DCNConfig) -> nn.Module:
    """The model a config describes.

    Args:
        config: a DLRM or DCN config (e.g. from `model_preset`).
    """
    return config.build()


__all__ = [
    "DCN",
    "DLRM",
    "PRESETS",
    "DCNConfig",
    "DCNStructure",
    "DLRMConfig",
    "ModelConfig",
    "build_model",
    "model_preset",
]
