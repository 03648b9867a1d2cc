"""DLRM and DCNv2 dense parts: shapes, the interaction and cross formulas, presets, learning."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from embeddings.models import (
    DCN,
    DLRM,
    PRESETS,
    DCNConfig,
    DCNStructure,
    DLRMConfig,
    ModelConfig,
    build_model,
    model_preset,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(n: int, config: DLRMConfig | DCNConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(n, config.num_dense, generator=g)
    embedded = torch.randn(n, config.num_sparse, config.embedding_dim, generator=g)
    return dense, embedded


def test_dlrm_interaction_is_the_upper_triangle_of_dot_products():
    config = DLRMConfig(num_sparse=4, embedding_dim=3, bottom_mlp=[5, 3], top_mlp=[7, 1])
    model = DLRM(config)
    dense, embedded = inputs(6, config)
    bottom = model.bottom(dense)
    got = model.interact(bottom, embedded)
    vectors = [bottom, *embedded.unbind(1)]
    pairs = [
        (vectors[i] * vectors[j]).sum(1)
        for i in range(len(vectors))
        for j in range(i + 1, len(vectors))
    ]
    expected = torch.cat([bottom, torch.stack(pairs, dim=1)], dim=1)
    torch.testing.assert_close(got, expected)
    assert config.num_interactions == 10
    assert model.top[0].in_features == 3 + 10


def test_dlrm_gives_one_logit_per_row_and_gradients_reach_the_embeddings():
    config = DLRMConfig()
    model = config.build()
    dense, embedded = inputs(5, config)
    embedded.requires_grad_(True)
    logits = model(dense, embedded)
    assert logits.shape == (5,)
    logits.sum().backward()
    assert embedded.grad is not None and embedded.grad.abs().sum() > 0


def test_dlrm_config_refuses_shapes_that_cannot_interact():
    with pytest.raises(ValidationError, match="bottom_mlp must end in embedding_dim"):
        DLRMConfig(embedding_dim=16, bottom_mlp=[64, 32])
    with pytest.raises(ValidationError, match="top_mlp must end in 1"):
        DLRMConfig(top_mlp=[64, 2])
    with pytest.raises(ValidationError):
        DLRMConfig(unknown=1)
    model = DLRMConfig().build()
    with pytest.raises(ValueError, match=r"\[n, 26, 16\]"):
        model(torch.zeros(2, 13), torch.zeros(2, 25, 16))


def test_cross_layer_follows_the_dcn_v2_formula_full_and_low_rank():
    config = DCNConfig(num_sparse=2, embedding_dim=4, cross_layers=1, deep_mlp=[])
    model = DCN(config)
    dense, embedded = inputs(3, config)
    x0 = torch.cat([dense, embedded.flatten(1)], dim=1)
    layer = model.cross[0].weight
    expected_cross = x0 * (x0 @ layer.weight.T + layer.bias) + x0
    expected = model.head(expected_cross).squeeze(1)
    torch.testing.assert_close(model(dense, embedded), expected)

    low = DCN(config.model_copy(update={"cross_rank": 2}))
    v, u = low.cross[0].weight
    assert v.weight.shape == (2, config.input_dim) and u.weight.shape == (config.input_dim, 2)
    expected_cross = x0 * (u(v(x0))) + x0
    torch.testing.assert_close(low(dense, embedded), low.head(expected_cross).squeeze(1))


def test_dcn_stacked_and_parallel_structures():
    base = DCNConfig(num_sparse=3, embedding_dim=4, cross_layers=2, deep_mlp=[8, 6])
    dense, embedded = inputs(4, base)
    stacked = DCN(base)
    parallel = DCN(base.model_copy(update={"structure": DCNStructure.PARALLEL}))
    assert stacked.head.in_features == 6
    assert parallel.head.in_features == base.input_dim + 6
    assert stacked.deep[0].in_features == parallel.deep[0].in_features == 13 + 12
    for model in (stacked, parallel):
        assert model(dense, embedded).shape == (4,)
    deep_only = DCN(base.model_copy(update={"cross_layers": 0}))
    assert len(deep_only.cross) == 0 and deep_only(dense, embedded).shape == (4,)
    with pytest.raises(ValidationError, match="cross layers, a deep network"):
        DCNConfig(cross_layers=0, deep_mlp=[])


def test_dcn_bottom_mlp_replaces_raw_dense_features():
    config = DCNConfig(num_sparse=2, embedding_dim=4, bottom_mlp=[8, 4], deep_mlp=[5])
    assert config.input_dim == 4 + 8
    dense, embedded = inputs(3, config)
    assert DCN(config)(dense, embedded).shape == (3,)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_score(name: str):
    config = model_preset(name)
    model = build_model(config)
    dense, embedded = inputs(2, config)
    assert model(dense, embedded).shape == (2,)


def test_mlperf_presets_have_the_mlperf_shapes():
    dlrm = model_preset("dlrm-mlperf")
    assert (dlrm.embedding_dim, dlrm.bottom_mlp, dlrm.top_mlp) == (
        128,
        [512, 256, 128],
        [1024, 1024, 512, 256, 1],
    )
    model = dlrm.build()
    widths = [m.out_features for m in model.top if isinstance(m, torch.nn.Linear)]
    assert widths == [1024, 1024, 512, 256, 1] and model.top[0].in_features == 128 + 351
    dcn = model_preset("dcn-mlperf")
    assert (dcn.cross_layers, dcn.cross_rank, dcn.input_dim) == (3, 512, 27 * 128)
    small = model_preset("dlrm-small")
    assert (small.embedding_dim, small.bottom_mlp, small.top_mlp) == (16, [64, 16], [64, 32, 1])
    with pytest.raises(ValueError, match="known"):
        model_preset("huge")


def test_job_config_picks_the_model_from_kind():
    adapter = TypeAdapter(ModelConfig)
    assert isinstance(adapter.validate_python({"kind": "dcn", "cross_rank": 8}), DCNConfig)
    parsed = adapter.validate_python({"kind": "dlrm", "embedding_dim": 8, "bottom_mlp": [8]})
    assert isinstance(parsed, DLRMConfig) and parsed.embedding_dim == 8
    assert (
        adapter.validate_json(model_preset("dcn-mlperf").model_dump_json()) == PRESETS["dcn-mlperf"]
    )


@pytest.mark.parametrize("name", ["dlrm-small", "dcn-small"])
def test_small_models_learn_a_planted_signal(name: str):
    torch.manual_seed(0)
    config = model_preset(name).model_copy(update={"num_sparse": 4})
    model = build_model(config)
    dense, embedded = inputs(128, config)
    # Label from a dense feature and an embedding coordinate: both inputs must be used.
    labels = ((dense[:, 0] + embedded[:, 1, 0]) > 0).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, embedded), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("config", [
    DLRMConfig(first_order=True, first_order_scale=0.5),
    DCNConfig(first_order=True, first_order_scale=0.5, cross_layers=1, deep_mlp=[8]),
])
def test_first_order_term_adds_each_ids_scalar_to_the_logit(config):
    # The lookup is d + 1 wide; its last column is the per-id scalar, summed into the logit
    # (scaled) and kept out of the interactions, so moving it moves the logit exactly.
    torch.manual_seed(0)
    model = config.build().eval()
    assert config.table_dim == config.embedding_dim + 1
    dense, embedded = torch.randn(5, 13), torch.randn(5, 26, config.table_dim)
    shifted = embedded.clone()
    shifted[:, 3, -1] += 2.0
    shifted[:, 7, -1] -= 0.5
    with torch.no_grad():
        delta = model(dense, shifted) - model(dense, embedded)
    torch.testing.assert_close(delta, torch.full((5,), 0.5 * 1.5))
    with pytest.raises(ValueError, match=r"d \+ 1"):
        model(dense, embedded[..., :-1])
    # Without the term the width stays d and the config round-trips with its default off.
    plain = type(config).model_validate({**config.model_dump(), "first_order": False})
    assert plain.table_dim == plain.embedding_dim


def test_first_order_scalars_get_gradients_through_the_logit():
    model = DLRMConfig(first_order=True).build()
    embedded = torch.randn(4, 26, 17, requires_grad=True)
    model(torch.randn(4, 13), embedded).sum().backward()
    torch.testing.assert_close(embedded.grad[..., -1], torch.full((4, 26), 0.1))
