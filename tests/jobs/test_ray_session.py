import subprocess
import sys


def test_an_unreachable_cluster_gives_an_actionable_error():
    code = "from jobs.ray_session import connect_or_start; connect_or_start()"
    env = {"RAY_ADDRESS": "127.0.0.1:1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:1" in done.stderr
