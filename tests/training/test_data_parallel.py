"""The dense model under DDP: built without any warning of the project's own making (the
deprecated `broadcast_buffers` argument printed a FutureWarning per worker and run).

The process group runs in a fresh interpreter with an in-memory store: a default process
group in the pytest process would outlive the test beside the session's Ray driver, and a
collective that hangs there would hang the whole suite instead of failing this test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from embeddings.models import DLRMConfig
from training.model import data_parallel

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                        timeout=timedelta(seconds=30))
try:
    model = DLRMConfig(embedding_dim=4, bottom_mlp=[8, 4], top_mlp=[8, 1]).build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddp = data_parallel(model, torch.device("cpu"))
        logits = ddp(torch.rand(5, 13), torch.rand(5, 26, 4))
        logits.sum().backward()
    assert logits.shape == (5,), logits.shape
    assert all(p.grad is not None for p in model.parameters())
    # DLRM's one buffer (its interaction pairs) is a constant: synced at construction,
    # never again before a forward.
    assert list(model.buffers()), "DLRM lost its interaction buffer"
    assert not ddp.forward_sync_buffers, "DDP syncs buffers before every forward"
finally:
    dist.destroy_process_group()
print("ok")
"""


def test_ddp_wraps_the_dense_model_without_warnings_or_per_step_buffer_syncs() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ok"
