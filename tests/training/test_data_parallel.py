"""The dense model under DDP: built without any warning of the project's own making (the
deprecated `broadcast_buffers` argument printed a FutureWarning per worker and run)."""

from __future__ import annotations

import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from embeddings.models import DLRMConfig
from training.model import data_parallel


def test_ddp_wraps_the_dense_model_without_warnings_or_per_step_buffer_syncs(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    try:
        model = DLRMConfig(embedding_dim=4, bottom_mlp=[8, 4], top_mlp=[8, 1]).build()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ddp = data_parallel(model, torch.device("cpu"))
            logits = ddp(torch.rand(5, 13), torch.rand(5, 26, 4))
            logits.sum().backward()
        assert logits.shape == (5,)
        assert all(p.grad is not None for p in model.parameters())
        # DLRM's one buffer (its interaction pairs) is a constant: synced at construction,
        # never again before a forward.
        assert list(model.buffers()) and not ddp.forward_sync_buffers
    finally:
        dist.destroy_process_group()
