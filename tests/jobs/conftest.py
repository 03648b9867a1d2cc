"""A small synthetic dataset shared by the job tests (generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import synth


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    code = synth.main(["--rows", "120000", "--days", "2", "--out", str(out), "--seed", "3",
                       "--no-ray", "--no-progress"])
    assert code == 0
    return out
