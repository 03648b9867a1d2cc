"""What is checked before or while a model is deployed, without starting Serve.

The builder refuses a broken model directory before anything is deployed; the settings
refuse impossible batching; the token comes from an environment variable or a secret file
that can rotate; export_model refuses metadata that would corrupt its own checksum.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from pydantic import ValidationError
from serving_helpers import build_test_model

from embeddings.serving import MODEL_FILE, ModelFileError, check_model_dir, export_model
from services.app import build_app
from services.auth import BearerAuth
from services.served_model import ScoringSettings, load_for_serving

REASONS = {
    "missing": "does not exist",
    "truncated": "fails its checksum",
    "checksum": "fails its checksum",
}


@pytest.mark.parametrize("broken", sorted(REASONS))
def test_builder_refuses_a_broken_model_dir_before_deploying(broken, model_dirs):
    with pytest.raises(ModelFileError, match=REASONS[broken]):
        build_app({"model_dir": str(model_dirs[broken])})


def test_builder_passes_a_good_dir_as_user_config(model_dirs):
    app = build_app({"model_dir": str(model_dirs["v2"]), "version": "2",
                     "max_rows_per_request": "100", "num_replicas": "2"})
    deployment = app._bound_deployment
    assert deployment.user_config == {"model_dir": str(model_dirs["v2"]), "version": "2",
                                      "max_rows_per_request": 100, "max_batch_rows": 8192,
                                      "batch_wait_timeout_s": 0.0}
    assert deployment.num_replicas == 2
    # Without a model, the Serve config's deployment-level user_config supplies it.
    assert build_app({})._bound_deployment.user_config is None


def test_builder_refuses_unknown_or_inconsistent_arguments(model_dirs):
    with pytest.raises(ValidationError, match="model_dirr"):
        build_app({"model_dirr": "x"})
    with pytest.raises(ValidationError, match="max_batch_rows"):
        build_app({"model_dir": str(model_dirs["v1"]), "max_rows_per_request": 5000,
                   "max_batch_rows": 4096})


def test_settings_limits():
    ScoringSettings(model_dir="m")
    for bad in ({}, {"model_dir": ""}, {"model_dir": "m", "max_rows_per_request": 0},
                {"model_dir": "m", "batch_wait_timeout_s": -1},
                {"model_dir": "m", "modeldir": "x"}):
        with pytest.raises(ValidationError):
            ScoringSettings.model_validate(bad)


def test_model_json_errors_say_what_is_wrong(model_dirs, tmp_path):
    assert check_model_dir(model_dirs["v1"])["version"] == "v1"
    half = tmp_path / "half"
    half.mkdir()
    (half / MODEL_FILE).write_text((model_dirs["v1"] / MODEL_FILE).read_text()[:200])
    with pytest.raises(ModelFileError, match="not valid JSON"):
        check_model_dir(half)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match=r"no model\.json"):
        check_model_dir(empty)


def test_served_version_defaults(model_dirs, tmp_path):
    assert load_for_serving(ScoringSettings(model_dir=str(model_dirs["v1"]))).version == "v1"
    assert load_for_serving(
        ScoringSettings(model_dir=str(model_dirs["v1"]), version="x")).version == "x"
    anonymous = export_model(build_test_model(3), tmp_path / "anon")
    sha = json.loads((anonymous / MODEL_FILE).read_text())["weights_sha256"]
    assert load_for_serving(ScoringSettings(model_dir=str(anonymous))).version == sha[:12]


def test_export_refuses_metadata_that_overrides_what_it_computes(tmp_path):
    with pytest.raises(ValueError, match="weights_sha256"):
        export_model(build_test_model(4), tmp_path / "m", {"weights_sha256": "0" * 64})


def test_token_from_env_value():
    auth = BearerAuth(token="s3cret")
    assert auth.enabled
    assert auth.allows("Bearer s3cret") and auth.allows("bearer s3cret")
    for header in (None, "", "s3cret", "Bearer", "Bearer wrong", "Basic s3cret"):
        assert not auth.allows(header), header
    assert BearerAuth().allows(None)  # no token configured: open
    with pytest.raises(ValueError, match="not both"):
        BearerAuth(token="a", token_file="/b")


def test_token_file_is_reread_when_the_secret_rotates(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("first\n")
    auth = BearerAuth(token_file=str(secret))
    assert auth.allows("Bearer first")
    secret.write_text("second-token")
    os.utime(secret, ns=(time.time_ns(), time.time_ns() + 10**9))  # a newer mtime, surely
    assert auth.allows("Bearer second-token") and not auth.allows("Bearer first")
    secret.unlink()  # mid-rotation: keep the last token rather than opening the API
    assert auth.allows("Bearer second-token") and not auth.allows(None)


def test_a_configured_but_missing_token_file_stops_the_replica(tmp_path):
    with pytest.raises(ValueError, match="EMBPRESS_API_TOKEN_FILE"):
        BearerAuth(token_file=str(tmp_path / "nope"))
    (tmp_path / "blank").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        BearerAuth(token_file=str(tmp_path / "blank"))
