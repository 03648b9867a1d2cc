"""The search's config without Ray: errors that name the field, and every drawn point a
valid training config."""

from __future__ import annotations

import pytest
import yaml
from search_helpers import raw_search, search_config

from jobs.config import ConfigError, load_config
from training.search.config import TuneConfig


def _invalid(tmp_path, **overrides) -> str:
    with pytest.raises(ValueError) as e:
        search_config(tmp_path / "data", tmp_path, "x", **overrides)
    return str(e.value)


def test_config_errors_name_the_field(tmp_path):
    assert "methods.nope: unknown method" in _invalid(tmp_path, search={"methods": {"nope": {}}})
    message = _invalid(tmp_path, search={"methods": {"cafe": {"treshold": [1, 2]}}})
    assert "methods.cafe.treshold: no such field" in message and "threshold" in message
    assert "set by the search" in _invalid(tmp_path, search={"methods": {"hash": {"ratio": 5}}})
    assert "k/d must be 0" in _invalid(tmp_path, search={"mlet": [0, 1]})
    assert "hash_share" in _invalid(
        tmp_path, search={"methods": {"cafe": {"hash_share": {"low": 0.5, "high": 1.5}}}})
    # QR by concatenation splits the width in two: an odd width is refused up front.
    assert "even width" in _invalid(
        tmp_path, search={"methods": {"qr": {"operation": "concat"}}, "embedding_dim": [7, 8]})
    assert "quantize" in _invalid(tmp_path, search={"quantize": ["int3"]})
    assert "needs max_serving_bytes" in _invalid(tmp_path, objective={"mode": "budget",
                                                                      "max_serving_bytes": None})
    assert "schedule.eval_every" in _invalid(tmp_path, schedule={"eval_every": None})


def test_yaml_config_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    raw = raw_search(tmp_path / "data", tmp_path, "x")
    raw["trials"]["num_samples"] = 0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"trials\.num_samples"):
        load_config(path, TuneConfig)


def test_every_drawn_point_makes_a_valid_training_config(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = search_config(tmp_path / "data", tmp_path, "x",
                     search={"methods": {"qr": {"operation": ["product", "sum"]}, "hash": {}},
                             "mlet": [0, 2, 4], "dense_lr": {"low": 1e-4, "high": 1e-2,
                                                              "log": True}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        point = config.search.draw(study.ask())
        train = config.trial_config(point, tmp_path / "trial")
        method = train.embeddings.method
        seen.add((method.method, getattr(method, "operation", None), point["mlet"]))
        dim = point["embedding_dim"]
        assert train.model_spec.embedding_dim == dim == train.embeddings.dim
        assert train.model_spec.bottom_mlp[-1] == dim  # DLRM dots it with the embeddings
        assert method.mlet_dim == (point["mlet"] * dim or None)
        assert 1e-4 <= train.optimizer.dense_lr <= 1e-2
        assert train.export.out == tmp_path / "trial" / "model"
        assert train.run_dir == (tmp_path / "trial" / "train").resolve()
        # The training job's own validation accepts it once cardinalities are known.
        train.collection([50_000] * 26)
    # QR by product never gets MLET (the projection cannot fold through a product) ...
    assert all(k == 0 for m, op, k in seen if op == "product")
    # ... while the linear combiners get every MLET width.
    assert {k for m, op, k in seen if m == "hash"} == {0, 2, 4}


def test_a_two_stage_method_is_searched_from_a_trained_model(tmp_path):
    import optuna

    space = {"methods": {"lowrank": {}, "hash": {}}, "mlet": [0, 2],
             "ratio": {"low": 2, "high": 8, "log": True}}
    assert "from_model: search.methods draws ['lowrank']" in _invalid(tmp_path, search=space)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "model.json").write_text("{}")
    too_far = {**space, "ratio": {"low": 2, "high": 100, "log": True}}
    message = _invalid(tmp_path, search=too_far, from_model=str(trained))
    assert "lowrank cannot reach ratio 100" in message and "the largest is" in message
    config = search_config(tmp_path / "data", tmp_path, "x", search=space,
                           from_model=str(trained))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(20):
        point = config.search.draw(study.ask())
        train = config.trial_config(point, tmp_path / "trial")
        assert train.from_model == trained
        if point["method"] == "lowrank":
            assert point["mlet"] == 0, "low-rank holds its own projection: no MLET"
            method = train.collection([50_000] * 26).resolve()[0]["C1"]
            dim = point["embedding_dim"]
            assert method.rank_for(dim) == max(1, int(dim / point["ratio"]))
        drawn.add(point["method"])
    assert drawn == {"lowrank", "hash"}
