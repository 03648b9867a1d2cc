import pytest
from pydantic import BaseModel, ConfigDict, Field

from jobs.config import ConfigError, load_config


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(gt=0)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inner: Inner


def test_valid_yaml_loads(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner:\n  lr: 0.1\n")
    assert load_config(p, Outer).inner.lr == 0.1


def test_bad_field_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"inner\.lr"):
        load_config(p, Outer)


def test_unknown_field_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner: {lr: 1}\nbogus: 3\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(p, Outer)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", Outer)


def test_verbose_brings_ray_trains_info_lines_back(synth_data, ray_cluster, tmp_path,
                                                   monkeypatch):
    import yaml

    from jobs import train
    from training.run import LOG_LEVEL_ENV, train_log_level

    # setenv first: monkeypatch then undoes what --verbose sets, even where the variable was
    # unset (a lone delenv of an unset variable records nothing to undo, and INFO would
    # leak into the later job tests' environment).
    monkeypatch.setenv(LOG_LEVEL_ENV, "WARNING")
    monkeypatch.delenv(LOG_LEVEL_ENV)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": str(synth_data)}}))
    quiet = train.build_parser().parse_args(["--config", str(path)])
    assert train.config_on_ray(train.load, quiet) is not None
    assert train_log_level() == "WARNING"
    loud = train.build_parser().parse_args(["--config", str(path), "--verbose"])
    assert train.config_on_ray(train.load, loud) is not None
    assert train_log_level() == "INFO"
