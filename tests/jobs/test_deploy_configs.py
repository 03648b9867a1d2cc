"""Every YAML under deploy/ is loaded and checked, so none of them can rot."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.config import load_config
from training.config import TrainConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALL_YAML = sorted(DEPLOY.rglob("*.yaml"))


def _check_train(path: Path) -> None:
    config = load_config(path, TrainConfig)
    # A preset's embeddings must resolve at some size: real sizes come from the data.
    config.collection([1000] * config.model_spec.num_sparse)


def _check_tune(path: Path) -> None:
    from training.search.config import TuneConfig

    load_config(path, TuneConfig)


def _check_serve(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))


def _check_rayjob(doc: dict) -> None:
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert head and all("image" in c for c in head)
    yaml.safe_load(spec["runtimeEnvYAML"])


def _check_rayservice(doc: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    spec = doc["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    local = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    assert serve_config["applications"][0]["import_path"] == local["applications"][0]["import_path"]
    assert spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]


def _check_kuberay(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1", path
    {"RayJob": _check_rayjob, "RayService": _check_rayservice}[doc["kind"]](doc)


def _check_cluster(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in doc, f"{path}: missing {key}"
    assert doc["head_node_type"] in doc["available_node_types"]


def _check_runtime_env(path: Path) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(path.read_text()))


def checker(path: Path):
    rel = path.relative_to(DEPLOY)
    if rel.parts[0] == "kuberay":
        return _check_kuberay
    if rel.parts[0] == "configs":
        return _check_tune if path.name.startswith("tune_") else _check_train
    return {"serve.yaml": _check_serve, "cluster.yaml": _check_cluster,
            "runtime_env.yaml": _check_runtime_env}[path.name]


def test_deploy_has_the_expected_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in ALL_YAML}
    for wanted in ("configs/small_synthetic.yaml", "configs/criteo_kaggle.yaml",
                   "configs/criteo_terabyte.yaml", "cluster.yaml", "kuberay/rayjob-train.yaml"):
        assert wanted in names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_deploy_yaml_validates(path):
    checker(path)(path)


def test_a_broken_config_names_the_field(tmp_path):
    from jobs.config import ConfigError

    text = (DEPLOY / "configs" / "small_synthetic.yaml").read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("batch_size: 4096", "batch_size: -5"))
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(broken, TrainConfig)
