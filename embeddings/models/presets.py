"""Named model shapes: MLPerf's Criteo Terabyte shapes, and small ones that train here in minutes.

A job config names a preset instead of repeating layer widths; `model_preset` returns a
config the caller may still adjust with `model_copy(update=...)`.
"""

from __future__ import annotations

from embeddings.models.dcn import DCNConfig, DCNStructure
from embeddings.models.dlrm import DLRMConfig

PRESETS: dict[str, DLRMConfig | DCNConfig] = {
    # MLPerf Training DLRM (v0.7-v2.1) on Criteo Terabyte.
    "dlrm-mlperf": DLRMConfig(
        embedding_dim=128, bottom_mlp=[512, 256, 128], top_mlp=[1024, 1024, 512, 256, 1]
    ),
    # MLPerf Training DLRM-DCNv2 (v3.0+): the same MLPs, a 3-layer rank-512 cross network
    # between them; the top MLP's last layer is the DCN's logit head.
    "dcn-mlperf": DCNConfig(
        embedding_dim=128,
        bottom_mlp=[512, 256, 128],
        cross_layers=3,
        cross_rank=512,
        deep_mlp=[1024, 1024, 512, 256],
        structure=DCNStructure.STACKED,
    ),
    # Trains on synthetic data in minutes on 2 CPU cores.
    "dlrm-small": DLRMConfig(embedding_dim=16, bottom_mlp=[64, 16], top_mlp=[64, 32, 1]),
    "dcn-small": DCNConfig(embedding_dim=16, cross_layers=2, cross_rank=64, deep_mlp=[64, 32]),
}


def model_preset(name: str) -> DLRMConfig | DCNConfig:
    """The config of a named preset.

    Args:
        name: one of `PRESETS` (dlrm-mlperf, dcn-mlperf, dlrm-small, dcn-small).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
