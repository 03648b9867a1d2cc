"""The table optimizers touch only the rows a batch used, follow their update rules exactly,
and keep row-shaped state that can move with a row."""

from __future__ import annotations

import pytest
import torch

from embeddings.methods.hashing_trick import HashConfig
from embeddings.optim import LazyAdam, RowWiseAdagrad


def _sparse_step(opt_cls, ids: torch.Tensor, **kw):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(50, 4))
    before = table.detach().clone()
    opt = opt_cls([table], **kw)
    out = torch.nn.functional.embedding(ids, table, sparse=True)
    (out * torch.arange(1.0, 5.0)).sum().backward()
    assert table.grad.is_sparse
    opt.step()
    return table, before, opt


@pytest.mark.parametrize("opt_cls", [RowWiseAdagrad, LazyAdam])
def test_only_used_rows_change(opt_cls) -> None:
    ids = torch.tensor([3, 7, 3, 3, 41])
    table, before, opt = _sparse_step(opt_cls, ids, lr=0.1)
    used = torch.zeros(50, dtype=torch.bool)
    used[ids] = True
    assert torch.equal(table.detach()[~used], before[~used])
    assert bool((table.detach()[used] != before[used]).all())
    for value in opt.state[table].values():
        assert value.shape[0] == 50  # row-shaped
        flat = value.reshape(50, -1)
        assert bool((flat[~used] == 0).all()) and bool((flat[used] != 0).any())


def test_rowwise_adagrad_follows_fbgemm_rule() -> None:
    ids = torch.tensor([3, 7, 3, 3, 41])
    table, before, opt = _sparse_step(RowWiseAdagrad, ids, lr=0.1, eps=1e-8)
    g = torch.zeros(50, 4)
    g.index_add_(0, ids, torch.arange(1.0, 5.0).expand(5, 4))  # repeated ids sum
    acc = g.pow(2).mean(1)
    expected = before - 0.1 * g / (acc.sqrt() + 1e-8)[:, None]
    assert torch.allclose(table.detach(), expected, atol=1e-6)
    assert torch.allclose(opt.state[table]["sum"], acc)


def test_rowwise_adagrad_dense_gradients_use_the_same_rule() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 3))
    before = p.detach().clone()
    (p * torch.arange(18.0).view(6, 3)).sum().backward()
    RowWiseAdagrad([p], lr=0.5).step()
    g = torch.arange(18.0).view(6, 3)
    expected = before - 0.5 * g / (g.pow(2).mean(1).sqrt() + 1e-8)[:, None]
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_lazy_adam_equals_adam_when_every_row_is_used() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 4))
    b = torch.nn.Parameter(a.detach().clone())
    lazy, dense = LazyAdam([a], lr=0.05), torch.optim.Adam([b], lr=0.05)
    ids = torch.arange(8).repeat(3)
    for step in range(5):
        target = torch.randn(24, 4, generator=torch.Generator().manual_seed(step))
        for p, opt, sparse in ((a, lazy, True), (b, dense, False)):
            opt.zero_grad()
            out = torch.nn.functional.embedding(ids, p, sparse=sparse)
            (out - target).pow(2).sum().backward()
            opt.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_training_a_sparse_method_touches_only_its_used_rows() -> None:
    emb = HashConfig(rows=1000, mlet_dim=32).build(10_000, 8)
    before = emb.tables[0].detach().clone()
    opt = RowWiseAdagrad(emb.parameters(), lr=0.1)
    ids = torch.tensor([5, 17, 5, 9999])
    emb(ids).sum().backward()
    opt.step()
    used = torch.zeros(1000, dtype=torch.bool)
    used[emb.mapper(ids).rows[:, 0]] = True
    changed = (emb.tables[0].detach() != before).any(1)
    assert torch.equal(changed, used)


def test_optimizers_accept_an_empty_sparse_gradient():
    # A sharded table that no worker sent ids to in a step gets an empty sparse gradient.
    from embeddings.optim import LazyAdam, RowWiseAdagrad

    for cls in (RowWiseAdagrad, LazyAdam):
        table = torch.nn.Parameter(torch.ones(5, 3))
        out = torch.nn.functional.embedding(torch.zeros(0, dtype=torch.long), table, sparse=True)
        out.sum().backward()
        before = table.detach().clone()
        cls([table], lr=0.1).step()
        assert torch.equal(table.detach(), before)


@pytest.mark.parametrize("opt_cls", [RowWiseAdagrad, LazyAdam])
def test_weight_decay_shrinks_only_the_rows_a_batch_read(opt_cls) -> None:
    # A zero upstream gradient isolates the decay: read rows move towards 0, the rest
    # keep their exact values (decay is lazy, nothing is spent on untouched rows).
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(50, 4))
    before = table.detach().clone()
    opt = opt_cls([table], lr=0.1, weight_decay=0.5)
    ids = torch.tensor([3, 7, 3])
    (torch.nn.functional.embedding(ids, table, sparse=True) * 0).sum().backward()
    opt.step()
    after = table.detach()
    read = torch.zeros(50, dtype=torch.bool)
    read[ids] = True
    assert torch.equal(after[~read], before[~read])
    assert bool((after[read].abs() < before[read].abs()).all())
    assert bool((torch.sign(after[read]) == torch.sign(before[read])).all())


def test_rowwise_adagrad_weight_decay_is_l2_added_to_the_gradient() -> None:
    # FBGEMM's EXACT_ROWWISE_ADAGRAD with WeightDecayMode.L2: g += wd·w, then the usual rule.
    table, before, _ = _sparse_step(RowWiseAdagrad, torch.tensor([2]), lr=0.1,
                                    weight_decay=0.3)
    g = torch.arange(1.0, 5.0) + 0.3 * before[2]
    acc = g.pow(2).mean()
    torch.testing.assert_close(table.detach()[2], before[2] - 0.1 * g / (acc.sqrt() + 1e-8))
