"""The GPU path: every method, the sharded collection and the dense models train on a CUDA
device as they do on the CPU (up to the order of float sums), and collapse there to the same
serving form. CI has no GPU, so these skip there with the reason; on a GPU machine run
`pytest tests/embeddings/test_cuda.py tests/jobs/test_train_cuda.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.schema import TERABYTE_CARDINALITIES
from embeddings.collection import CollectionConfig, EmbeddingCollection, every_method
from embeddings.methods.base import FeatureStats
from embeddings.metrics import EvalAccumulator, gather_across_workers
from embeddings.models import DCNConfig, DLRMConfig
from embeddings.optim import LazyAdam, RowWiseAdagrad, train_step
from embeddings.sharding import FeatureSize, ShardedEmbeddingCollection, plan_sharding
from embeddings.sharding.router import _all_to_all, _AllToAll
from embeddings.tables import TableOptimizer
from jobs.benchmarks.embedding_speed import zipf_batches

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here; the GPU path runs on a GPU machine"
)

DIM, K, BATCH, STEPS = 16, 32, 2048, 25
# Terabyte's 26 cardinalities scaled down 2000× (at least 3 values each).
CARDS = [max(3, n // 2000) for n in TERABYTE_CARDINALITIES]
# Sums over a batch run in another order on the GPU: float32 rounding, compounded by
# 25 Adagrad steps, stays far below this.
TOLERANCE = 2e-4
GPU = torch.device("cuda", 0)


def _stats(batches: list[torch.Tensor]) -> dict[str, FeatureStats]:
    ids = torch.cat(batches)
    return {f"C{j + 1}": FeatureStats.from_ids(ids[:, j]) for j in range(len(CARDS))}


def _train(collection: nn.Module, batches: list[torch.Tensor], device: torch.device):
    """Train on `device`; returns the loss of every step."""
    g = torch.Generator().manual_seed(1)
    head = (torch.randn(len(CARDS) * DIM, generator=g) / (len(CARDS) * DIM) ** 0.5).to(device)
    labels = (torch.arange(BATCH) % 4 == 0).float().to(device)
    # The tables train in the collection's store (fused into backward under FBGEMM's TBE);
    # MLET's projections with Adam.
    dense = collection.dense_parameters()
    opt = torch.optim.Adam(dense, lr=1e-3) if dense else None
    losses = []
    for batch in batches:
        logits = collection(batch.to(device)).flatten(1) @ head
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt is not None:
            opt.step()
        collection.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    return zipf_batches(CARDS, STEPS + 1, BATCH)


@pytest.mark.parametrize("name", sorted(every_method(K)))
def test_method_trains_on_cuda_as_on_cpu_and_collapses_there(name, batches) -> None:
    method = every_method(K)[name]
    stats = _stats(batches[:4])
    config = CollectionConfig(dim=DIM, cardinalities=CARDS,
                              ratio=None if method["method"] == "full" else 10, method=method)
    trained = []
    for device in (torch.device("cpu"), GPU):
        torch.manual_seed(0)
        collection = EmbeddingCollection(config, stats, TableOptimizer(lr=0.1), device=device)
        losses = _train(collection, batches[:STEPS], device)
        trained.append((collection, losses))
    (cpu_model, cpu_losses), (gpu_model, gpu_losses) = trained
    assert gpu_losses[-1] < gpu_losses[0], f"{name} did not learn on CUDA: {gpu_losses}"
    assert np.allclose(gpu_losses, cpu_losses, atol=TOLERANCE), (gpu_losses, cpu_losses)

    ids = batches[STEPS]
    unseen = torch.randint(2**33, 2**40, (256, len(CARDS)))
    with torch.no_grad():
        for probe in (ids, unseen):
            on_gpu = gpu_model(probe.to(GPU))
            assert on_gpu.device == GPU
            assert (on_gpu.cpu() - cpu_model(probe)).abs().max().item() <= TOLERANCE
            serving = gpu_model.collapse()
            assert (serving(probe.to(GPU)) - on_gpu).abs().max().item() <= 1e-5
            int8 = serving.quantize("int8")(probe.to(GPU))
            assert int8.device == GPU and (int8 - on_gpu).abs().max().item() < 0.05


@pytest.mark.parametrize("model", [DLRMConfig(embedding_dim=DIM, num_sparse=len(CARDS)),
                                   DCNConfig(embedding_dim=DIM, num_sparse=len(CARDS))])
def test_dense_models_compute_the_same_logits_on_cuda(model) -> None:
    torch.manual_seed(0)
    cpu = model.build()
    gpu = model.build().to(GPU)
    gpu.load_state_dict(cpu.state_dict())
    dense, embedded = torch.randn(512, 13), torch.randn(512, len(CARDS), DIM)
    expected = cpu(dense, embedded)
    got = gpu(dense.to(GPU), embedded.to(GPU))
    assert got.shape == (512,)
    assert (got.cpu() - expected).abs().max().item() < 1e-4


@pytest.fixture
def nccl(tmp_path):
    """A one-process NCCL group (one GPU cannot hold two NCCL ranks)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=GPU)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_exchange_and_metric_gather_run_over_nccl(nccl) -> None:
    # The router's exchange with the split lists it computes, forward and backward.
    x = torch.arange(12.0, device=GPU).view(6, 2).requires_grad_()
    out = _AllToAll.apply(x, [6], [6], nccl, 0.5)
    assert torch.equal(out.detach(), x.detach())
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5))
    ids = torch.tensor([3, 1, 2], device=GPU)
    assert torch.equal(_all_to_all(ids, [3], [3], nccl), ids)
    # Predictions are gathered on the GPU for NCCL; AUC over the gathered rows.
    assert torch.equal(gather_across_workers(ids, nccl), ids)
    acc = EvalAccumulator(with_bands=False)
    acc.update(torch.tensor([0.1, 2.0, -1.0, 0.5], device=GPU),
               torch.tensor([0.0, 1.0, 0.0, 1.0], device=GPU), None)
    assert acc.compute()["auc"] == 1.0


@pytest.mark.parametrize("sparse_optimizer", [RowWiseAdagrad, LazyAdam])
def test_sharded_collection_with_ddp_trains_over_nccl_as_on_cpu(nccl, batches,
                                                               sparse_optimizer) -> None:
    stats = _stats(batches[:4])
    config = CollectionConfig(dim=DIM, cardinalities=CARDS, ratio=10,
                              method={"method": "cafe", "mlet_dim": K})
    methods, _ = config.resolve(stats)
    names = config.feature_names
    sizes = [FeatureSize(name=n, bytes=CARDS[i] * DIM * 4, stateless=False)
             for i, n in enumerate(names)]
    plan = plan_sharding(sizes, 1)
    dense_x = torch.randn(BATCH, 13, generator=torch.Generator().manual_seed(3))
    labels = (torch.arange(BATCH) % 3 == 0).float()

    def run(device: torch.device, ddp: bool) -> list[float]:
        torch.manual_seed(0)
        model = DLRMConfig(embedding_dim=DIM, num_sparse=len(CARDS)).build().to(device)

        def make(i: int, s: int, num_shards: int) -> nn.Module:
            torch.manual_seed(100 + i)
            return methods[names[i]].build(CARDS[i], DIM, stats[names[i]])

        embeddings = ShardedEmbeddingCollection(plan, make, DIM, device=device)
        if ddp:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device])
        # Owned tables train in the local store; replicated ones (none here) need their own.
        tables = embeddings.replicated_tables()
        sparse_opt = sparse_optimizer(tables, lr=0.05) if tables else None
        dense_opt = torch.optim.Adam([*model.parameters(), *embeddings.dense_parameters()],
                                     lr=1e-3)
        losses = []
        for batch in batches[:10]:
            logits = model(dense_x.to(device), embeddings(batch.to(device)))
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(device))
            train_step(loss, sparse_opt, dense_opt, embeddings)
            losses.append(loss.item())
        return losses

    on_gpu = run(GPU, ddp=True)
    on_cpu = run(torch.device("cpu"), ddp=False)
    assert on_gpu[-1] < on_gpu[0]
    assert np.allclose(on_gpu, on_cpu, atol=1e-3), (on_gpu, on_cpu)


def test_cafe_checkpoint_taken_on_the_gpu_resumes_there(batches, tmp_path) -> None:
    # A worker resumes by loading its checkpoint onto its GPU: the sketch's saved arrays
    # arrive on the GPU and must go back to host memory.
    stats = _stats(batches[:4])
    config = CollectionConfig(dim=DIM, cardinalities=CARDS, ratio=10,
                              method={"method": "cafe", "mlet_dim": K})

    def fresh() -> EmbeddingCollection:
        torch.manual_seed(0)
        return EmbeddingCollection(config, stats).to(GPU)

    trained = fresh()
    _train(trained, batches[:10], GPU)
    torch.save(trained.state_dict(), tmp_path / "rank-0.pt")
    resumed = fresh()
    state = torch.load(tmp_path / "rank-0.pt", weights_only=True, map_location=GPU)
    resumed.load_state_dict(state)
    probe = batches[STEPS].to(GPU)
    with torch.no_grad():
        assert torch.equal(resumed(probe), trained(probe))
    # The same sketch: both go on to train identically.
    # (CUDA's atomic adds may sum a row's gradients in another order: not bit-identical.)
    assert np.allclose(_train(resumed, batches[10:12], GPU), _train(trained, batches[10:12], GPU),
                       atol=1e-5)
