"""The scoring service on real Ray Serve, over real HTTP.

One application serves the whole module. It is deployed the way `serve deploy
deploy/serve.yaml` deploys it (the declarative API, from that very file, with the model
directory and a token swapped in), so model changes take the production path: Serve calls
`reconfigure` on the running replica.
"""

from __future__ import annotations

import copy
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from serving_helpers import BODY_DEADLINE_S, TOKEN, offline_probabilities, raw_tsv_rows

from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS
from jobs import score as score_job
from jobs import serve as serve_job
from jobs.ports import free_port
from services.app import application_urls
from services.auth import TOKEN_ENV

REPO = Path(__file__).resolve().parents[2]
APP = "embpress-test"
MAX_ROWS = 512
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _app_config(model_dir: Path, version: str, name: str = APP,
                route_prefix: str = "/") -> dict[str, Any]:
    """deploy/serve.yaml's application, pointed at a test model, one replica, a token."""
    base = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())["applications"][0]
    app = copy.deepcopy(base)
    app.update(name=name, route_prefix=route_prefix,
               runtime_env={"env_vars": {TOKEN_ENV: TOKEN}})
    deployment = app["deployments"][0]
    deployment["user_config"].update(model_dir=str(model_dir), version=version,
                                     max_rows_per_request=MAX_ROWS)
    deployment.pop("autoscaling_config")
    # One replica: a second one would fight the tests for the machine's 2 cores and make
    # "which version answered" depend on routing.
    deployment["num_replicas"] = 1
    return app


def _apply(*apps: dict[str, Any]) -> None:
    """What `serve deploy` does: hand the whole config to the controller."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": apps}))


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def service(ray_cluster, model_dirs) -> Iterator[str]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    _apply(_app_config(model_dirs["v1"], "v1"))
    _wait(lambda: httpx.get(f"{url}/readyz").status_code == 200, 120, "the app to be ready")
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def direct(service: str) -> str:
    """The replica's own URL (direct ingress is on for the test session, see conftest)."""
    urls = application_urls(APP)["direct"]
    assert len(urls) == 1, urls
    return urls[0]


@pytest.fixture(scope="module")
def http(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, headers=AUTH, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def rows(unlabelled_tsv: Path) -> list[dict[str, list]]:
    return raw_tsv_rows(unlabelled_tsv)


def _score(http: httpx.Client, rows: list[dict]) -> tuple[np.ndarray, str]:
    response = http.post("/v1/score", json={"rows": rows})
    assert response.status_code == 200, response.text
    body = response.json()
    return np.asarray(body["probabilities"]), body["version"]


def _named(row: dict[str, list]) -> dict[str, Any]:
    named = dict(zip(DENSE_COLUMNS, row["dense"], strict=True))
    named.update(zip(SPARSE_COLUMNS, row["categorical"], strict=True))
    return {k: v for k, v in named.items() if v is not None}  # absent means missing


# ---------------------------------------------------------------- correctness


def test_4000_rows_score_like_the_offline_model(http, rows, offline_scores):
    assert len(rows) == 4000
    got = np.concatenate([_score(http, rows[i:i + MAX_ROWS])[0]
                          for i in range(0, len(rows), MAX_ROWS)])
    assert got.shape == (4000,)
    np.testing.assert_allclose(got, offline_scores["v1"], atol=1e-5, rtol=0)
    assert np.ptp(got) > 0.01  # a real spread of scores, not one constant


def test_named_fields_and_mixed_rows_score_the_same(http, rows, offline_scores):
    named = [_named(r) for r in rows[:300]]
    got, version = _score(http, named)
    assert version == "v1"
    np.testing.assert_allclose(got, offline_scores["v1"][:300], atol=1e-5, rtol=0)
    mixed = [named[i] if i % 2 else rows[i] for i in range(300)]
    np.testing.assert_allclose(_score(http, mixed)[0], offline_scores["v1"][:300], atol=1e-5)


def test_concurrent_requests_each_get_their_own_rows(service, rows, offline_scores):
    # Concurrent requests are merged into batches (and a batch over 1,024 rows is scored in
    # slices); each request must get back exactly its own rows' scores.
    results: dict[int, np.ndarray] = {}

    def worker(k: int) -> None:
        with httpx.Client(base_url=service, headers=AUTH, timeout=30) as client:
            for j in range(4):
                size = MAX_ROWS if k < 4 else 1 + (k + j) % 64
                start = (k * 97 + j * 13) % (4000 - size)
                got, _ = _score(client, rows[start:start + size])
                results[k * 10 + j] = np.abs(got - offline_scores["v1"][start:start + size])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 64
    assert max(float(err.max()) for err in results.values()) <= 1e-5


# ---------------------------------------------------------------- bad input


def _good_row(rows):
    return rows[0]


def _with(row: dict, key: str, index: int, value: Any) -> dict:
    changed = copy.deepcopy(row)
    changed[key][index] = value
    return changed


BAD_INPUTS: dict[str, Callable[[list[dict]], tuple[dict[str, Any], int, list[str]]]] = {
    # name: rows → (request kwargs, status, words the message must contain)
    "12 dense values": lambda rows: (
        {"json": {"rows": [rows[0], {**rows[1], "dense": rows[1]["dense"][:12]}]}},
        422, ["rows[1].dense", "12 values, expected 13"]),
    "27 categorical values": lambda rows: (
        {"json": {"rows": [{**rows[0], "categorical": rows[0]["categorical"] + ["1"]}]}},
        422, ["rows[0].categorical", "27 values, expected 26"]),
    "named row with I14": lambda rows: (
        {"json": {"rows": [rows[0], rows[1], {"I14": 3}]}}, 422, ["rows[2].I14", "unknown"]),
    "non-hex categorical": lambda rows: (
        {"json": {"rows": [rows[0], _with(rows[1], "categorical", 4, "25c83cxz")]}},
        422, ["rows[1]", "C5", "not a hex value", "25c83cxz"]),
    "over-long categorical": lambda rows: (
        {"json": {"rows": [_with(rows[0], "categorical", 25, "123456789")]}},
        422, ["rows[0]", "C26", "more than 8 hex digits"]),
    "integer above int32": lambda rows: (
        {"json": {"rows": [rows[0], rows[1], rows[2], _with(rows[3], "dense", 5, 2**31)]}},
        422, ["rows[3]", "I6", "2147483647"]),
    "integer below int32": lambda rows: (
        {"json": {"rows": [{"I2": -(2**31) - 1}]}}, 422, ["rows[0].I2", "-2147483648"]),
    "float integer feature": lambda rows: (
        {"json": {"rows": [_with(rows[0], "dense", 0, 1.5)]}}, 422, ["rows[0]", "I1"]),
    "string integer feature": lambda rows: (
        {"json": {"rows": [{"I3": "7"}]}}, 422, ["rows[0].I3", "not an integer"]),
    "row that is not an object": lambda rows: (
        {"json": {"rows": [rows[0], [1, 2, 3]]}}, 422, ["rows[1]", "a row is an object"]),
    "non-JSON body": lambda rows: (
        {"content": b"I1=3&C1=ab", "headers": {"Content-Type": "application/json"}},
        422, ["body", "Invalid JSON"]),
    "truncated JSON": lambda rows: (
        {"content": json.dumps({"rows": rows[:2]}).encode()[:-7],
         "headers": {"Content-Type": "application/json"}}, 422, ["body", "JSON"]),
    "empty batch": lambda rows: ({"json": {"rows": []}}, 422, ["rows", "at least 1"]),
    "no rows field": lambda rows: ({"json": {"row": rows[:1]}}, 422, ["rows", "required"]),
    "batch over the maximum": lambda rows: (
        {"json": {"rows": rows[:MAX_ROWS + 1]}}, 413, ["rows", "513 rows", "512"]),
    "body over the byte limit": lambda rows: (
        {"content": b'{"rows": [' + b" " * (MAX_ROWS * 4096) + b"]}",
         "headers": {"Content-Type": "application/json"}}, 413, ["bytes", "512 rows"]),
    "chunked body over the byte limit": lambda rows: (
        {"content": iter([b'{"rows": ['] + [b" " * 65536] * 40 + [b"]}"]),
         "headers": {"Content-Type": "application/json"}}, 413, ["bytes", "512 rows"]),
    "wrong content type": lambda rows: (
        {"content": json.dumps({"rows": rows[:1]}).encode(),
         "headers": {"Content-Type": "text/plain"}}, 415, ["application/json", "text/plain"]),
    "form-encoded body": lambda rows: (
        {"data": {"rows": "x"}}, 415, ["application/json"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_and_the_next_request_is_fine(case, http, rows, offline_scores):
    kwargs, status, words = BAD_INPUTS[case](rows)
    response = http.post("/v1/score", **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, f"{word!r} not in {detail!r}"
    if status == 422 and "body" not in words:
        first = response.json()["errors"][0]
        assert first["row"] is not None or first["field"] == "rows"
    # The replica neither crashed nor stalled: the very next request is answered right.
    got, _ = _score(http, rows[10:14])
    np.testing.assert_allclose(got, offline_scores["v1"][10:14], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- auth, health, docs


def test_scoring_routes_need_the_token_health_routes_do_not(service, rows):
    with httpx.Client(base_url=service, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = anonymous.post("/v1/score", json={"rows": rows[:1]}, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token" in response.json()["detail"]
            assert anonymous.get("/v1/model", headers=headers).status_code == 401
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        # A token is set, so the docs pages (scripts from a public CDN) are off.
        assert anonymous.get("/docs").status_code == 404
        assert anonymous.get("/redoc").status_code == 404
        schema = anonymous.get("/openapi.json").json()
    request = schema["components"]["schemas"]["ScoreRequest"]
    assert request["examples"] and "rows" in request["properties"]
    assert {"ArrayRow", "NamedRow"} <= set(schema["components"]["schemas"])
    post = schema["paths"]["/v1/score"]["post"]
    assert post["security"] == [{"bearer": []}]
    assert set(post["requestBody"]["content"]["application/json"]["examples"]) == {
        "arrays", "named", "mixed"}
    assert {"401", "413", "415", "422"} <= set(post["responses"])


def test_model_info_names_version_settings_and_model(http, model_dirs):
    response = http.get("/v1/model")
    info = response.json()
    assert info["version"] == "v1"
    assert "model_dir" not in info and "model_dir" not in info["settings"]
    assert str(model_dirs["v1"].parent) not in response.text and '"/' not in response.text
    assert "hash (fp32)" in info["model"]["methods"]
    assert info["model"]["serving_bytes"]["embeddings"] > 0
    assert info["settings"]["max_rows_per_request"] == MAX_ROWS
    assert info["reload_error"] is None
    assert info["model"]["features"] == list(SPARSE_COLUMNS)
    assert len(info["model"]["weights_sha256"]) == 64


# ---------------------------------------------------------------- the client


def test_client_scores_a_tsv_file(service, unlabelled_tsv, offline_scores, tmp_path, capsys):
    out = tmp_path / "scores.tsv"
    code = score_job.main(["--url", service, "--input", str(unlabelled_tsv), "--output",
                           str(out), "--token", TOKEN, "--batch-size", "1000",
                           "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert "at most 512 rows" in err and "4,000 rows scored" in err and "v1" in err
    lines = out.read_text().splitlines()
    assert lines[0] == "probability"
    np.testing.assert_allclose(np.array(lines[1:], dtype=np.float64), offline_scores["v1"],
                               atol=1e-5, rtol=0)


def test_client_labelled_file_with_a_bad_line(service, criteo_samples, model_dirs, tmp_path,
                                              capsys, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the token from the environment this time
    lines = (criteo_samples / "criteo_kaggle_sample.tsv").read_text().splitlines()[:700]
    good = tmp_path / "good.tsv"
    good.write_text("\n".join(lines) + "\n")
    fields = lines[5].split("\t")
    fields[20] = "not-hex!"
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("\n".join([*lines[:5], "\t".join(fields), *lines[6:]]) + "\n")
    out, rejects = tmp_path / "scores.tsv", tmp_path / "rejects.jsonl"
    code = score_job.main(["--url", service, "--input", str(mixed), "--output", str(out),
                           "--rejects", str(rejects), "--batch-size", "256", "--concurrency",
                           "3", "--no-progress"])
    assert code == 0
    assert "1 input lines rejected" in capsys.readouterr().err
    assert json.loads(rejects.read_text())["line"] == 6
    scored = [line.split("\t") for line in out.read_text().splitlines()]
    assert scored[0] == ["label", "probability"] and len(scored) == 1 + 699
    expected = offline_probabilities(model_dirs["v1"], good)
    expected = np.delete(expected, 5)
    np.testing.assert_allclose([float(p) for _, p in scored[1:]], expected, atol=1e-5, rtol=0)
    assert [int(y) for y, _ in scored[1:]] == [int(x.split("\t")[0]) for i, x in
                                               enumerate(lines) if i != 5]


def test_client_without_token_says_so(service, unlabelled_tsv, tmp_path, capsys):
    code = score_job.main(["--url", service, "--input", str(unlabelled_tsv), "--output",
                           str(tmp_path / "s.tsv"), "--no-progress"])
    assert code == 1
    assert "needs a bearer token" in capsys.readouterr().err


# ---------------------------------------------------------------- model changes


class Load:
    """A client that keeps scoring in a thread and records every answer."""

    def __init__(self, url: str, rows: list[dict]) -> None:
        self.url, self.rows = url, rows
        self.answers: list[tuple[int, str]] = []  # (status, version or error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                batch = self.rows[i % 4000:i % 4000 + 8]
                try:
                    r = client.post("/v1/score", json={"rows": batch})
                    self.answers.append((r.status_code, r.json().get("version")
                                         if r.status_code == 200 else r.text))
                except httpx.HTTPError as exc:
                    self.answers.append((-1, repr(exc)))
                i += 8

    def __enter__(self) -> Load:
        self._thread.start()
        _wait(lambda: len(self.answers) >= 5, 30, "the load client to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)
        self._stop.set()
        self._thread.join()

    def failures(self) -> list[tuple[int, str]]:
        return [a for a in self.answers if a[0] != 200]


def _served(http: httpx.Client) -> dict[str, Any]:
    return http.get("/v1/model").json()


@pytest.mark.slow
def test_model_swaps_under_load_without_a_failed_request(service, http, rows, model_dirs,
                                                         offline_scores):
    before = _served(http)
    direct = application_urls(APP)["direct"]
    with Load(service, rows) as load, Load(direct[0], rows) as direct_load:
        _apply(_app_config(model_dirs["v2"], "v2"))
        _wait(lambda: _served(http)["version"] == "v2", 60, "version v2 to be served")
    assert len(load.answers) > 20 and len(direct_load.answers) > 20
    assert load.failures() == [] and direct_load.failures() == []
    # Swapped in place, so the direct-ingress port did not move.
    assert application_urls(APP)["direct"] == direct
    versions = [v for _, v in load.answers]
    assert versions[0] == "v1" and versions[-1] == "v2"
    # One replica, swapped in one assignment: never v1 again once v2 has answered.
    assert "v1" not in versions[versions.index("v2"):]
    got, version = _score(http, rows[:MAX_ROWS])
    assert version == "v2"
    np.testing.assert_allclose(got, offline_scores["v2"][:MAX_ROWS], atol=1e-5, rtol=0)
    after = _served(http)
    # Swapped inside the running replica (reconfigure), not by replacing the replica.
    assert after["replica"] == before["replica"] and after["loaded_at"] > before["loaded_at"]

    with Load(service, rows) as load:  # and back, for the tests that follow
        _apply(_app_config(model_dirs["v1"], "v1"))
        _wait(lambda: _served(http)["version"] == "v1", 60, "version v1 to be served")
    assert load.failures() == []


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["missing", "truncated", "checksum"])
def test_broken_model_dir_is_refused_and_the_old_model_keeps_serving(
        broken, service, http, rows, model_dirs, offline_scores):
    expected = {"missing": "does not exist", "truncated": "checksum",
                "checksum": "fails its checksum"}[broken]
    with Load(service, rows) as load:
        _apply(_app_config(model_dirs[broken], f"bad-{broken}"))
        _wait(lambda: _served(http)["reload_error"] is not None, 60, "the refusal")
    assert load.failures() == []
    assert {v for _, v in load.answers} == {"v1"}
    info = _served(http)
    assert info["version"] == "v1"
    # The reason, without the server's paths (the full one is in the replica's log).
    assert expected in info["reload_error"] and str(model_dirs[broken]) not in info["reload_error"]
    ready = httpx.get(f"{service}/readyz")
    assert ready.json() == {"ready": True, "version": "v1"} and "/" not in ready.text
    got, version = _score(http, rows[:64])
    assert version == "v1"
    np.testing.assert_allclose(got, offline_scores["v1"][:64], atol=1e-5, rtol=0)

    _apply(_app_config(model_dirs["v1"], "v1"))  # a good config clears the refusal
    _wait(lambda: _served(http)["reload_error"] is None, 60, "the refusal to clear")


@pytest.mark.slow
def test_a_new_app_with_a_broken_model_dir_fails_to_deploy_with_the_reason(
        service, http, model_dirs):
    from ray import serve

    good = _app_config(model_dirs["v1"], "v1")
    bad = _app_config(model_dirs["truncated"], "bad", name="embpress-broken",
                      route_prefix="/broken")
    _apply(good, bad)

    def failed() -> bool:
        return serve.status().applications["embpress-broken"].status == "DEPLOY_FAILED"

    _wait(failed, 120, "the broken app to fail")
    status = serve.status().applications["embpress-broken"]
    message = status.deployments["ScoringDeployment"].message
    assert "model change refused" in message and "fails its checksum" in message
    assert _served(http)["version"] == "v1"  # the other app never noticed
    _apply(good)
    _wait(lambda: "embpress-broken" not in serve.status().applications, 60, "cleanup")


# ---------------------------------------------------------------- hostile and busy clients


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _head(url: str, length: int, extra: str = "") -> bytes:
    host = url.removeprefix("http://")
    return (f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
            ).encode()


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return -1  # closed without an answer
        data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("path", ["proxy", "direct"])
def test_slow_uploads_leave_good_requests_answered(path, service, direct, rows):
    url = service if path == "proxy" else direct
    slow = []
    try:
        for _ in range(100):  # more than the replica's 64 scoring slots
            sock = _raw(url)
            sock.sendall(_head(url, 390) + b'{"row')
            slow.append(sock)
        took = []
        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as client:
            for i in range(10):
                start = time.perf_counter()
                response = client.post("/v1/score", json={"rows": rows[i:i + 4]})
                took.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
        assert max(took) < 1.0, took
        # The slow ones are answered 408 once their deadline passes, and their slots freed.
        for sock in slow[:5]:
            assert _status(sock) == 408
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize("path", ["proxy", "direct"])
def test_a_body_shorter_than_its_length_gets_408_within_the_deadline(path, service, direct,
                                                                     rows):
    url = service if path == "proxy" else direct
    body = json.dumps({"rows": rows[:1]}).encode()
    with _raw(url) as sock:
        start = time.perf_counter()
        sock.sendall(_head(url, len(body) + 10) + body)
        assert _status(sock) == 408
        assert time.perf_counter() - start < BODY_DEADLINE_S + 1.5


def _bad(http: httpx.Client, content: bytes, **headers: str) -> httpx.Response:
    return http.post("/v1/score", content=content,
                     headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("case", ["long key", "20 long keys", "long C3", "long I5"])
def test_echoes_of_huge_input_stay_small(case, http):
    n = 1_500_000  # under the test deployment's 2 MiB body limit
    row = {"long key": {"K" * n: 1},
           "20 long keys": {f"{k:02d}" + "K" * 80_000: 1 for k in range(20)},
           "long C3": {"C3": "a" * n}, "long I5": {"I5": "9" * n}}[case]
    response = _bad(http, json.dumps({"rows": [row]}).encode())
    assert response.status_code == 422
    assert len(response.content) < 4096
    assert "characters)" in response.json()["detail"]


def test_duplicate_keys_are_refused_naming_the_key(http, rows):
    good = json.dumps(rows[0])
    response = _bad(http, f'{{"rows": [{{"x": 1}}], "rows": [{good}]}}'.encode())
    assert response.status_code == 422 and "duplicate key 'rows'" in response.json()["detail"]
    row = f'{{"dense": {json.dumps(rows[1]["dense"])}, {good[1:]}'
    response = _bad(http, f'{{"rows": [{row}]}}'.encode())
    assert response.status_code == 422 and "duplicate key 'dense'" in response.json()["detail"]


def test_content_negotiation(http, rows, offline_scores):
    body = json.dumps({"rows": rows[:300]}).encode()
    response = _bad(http, gzip.compress(body), **{"Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["probabilities"], offline_scores["v1"][:300],
                               atol=1e-5, rtol=0)
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces in ~64 KiB
    response = _bad(http, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "inflates past" in response.json()["detail"]
    response = _bad(http, body, **{"Content-Encoding": "br"})
    assert response.status_code == 415 and "'br'" in response.json()["detail"]
    response = _bad(http, body.decode().encode("utf-16"),
                    **{"Content-Type": "application/json; charset=utf-16"})
    assert response.status_code == 415 and "'utf-16'" in response.json()["detail"]
    response = _bad(http, body, **{"Content-Type": "application/json; charset=UTF-8"})
    assert response.status_code == 200
    response = _bad(http, b'{"rows": [{"C1": "\\ud800"}]}')
    assert response.status_code == 422
    assert "escape \\ud800 " in response.json()["detail"]
    assert "surrogate" in response.json()["detail"]


def test_serve_urls_lists_the_proxy_and_the_replica(service, direct, capsys):
    assert serve_job.main(["--urls", "--app", APP]) == 0
    assert capsys.readouterr().out.split() == [service, direct]
    assert serve_job.main(["--urls", "--app", "no-such-app"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("serve: error: ")


def test_schema_matches_what_is_accepted_and_no_server_banner(http, direct, rows):
    schema = http.get("/openapi.json").json()["components"]["schemas"]
    dense = schema["ArrayRow"]["properties"]["dense"]["items"]["anyOf"][0]
    assert dense["type"] == "number" and dense["multipleOf"] == 1
    row = copy.deepcopy(rows[0])
    row["dense"] = [14.0 if v is not None else None for v in row["dense"]]
    response = http.post("/v1/score", json={"rows": [row]})
    assert response.status_code == 200, response.text
    assert "server" not in response.headers
    with httpx.Client(base_url=direct, headers=AUTH, timeout=30) as client:
        response = client.post("/v1/score", json={"rows": [row]})
        assert response.status_code == 200 and "server" not in response.headers
