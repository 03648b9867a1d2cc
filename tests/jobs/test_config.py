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
