"""The application builder behind `serve run` / `serve deploy` and `python -m jobs.serve`.

`import_path: services.app:build_app` in deploy/serve.yaml. Given a model directory in its
arguments, the builder checks it (model.json, weights present, checksum) before anything is
deployed: a broken directory stops `serve run`/`serve.run` with the reason and, under
`serve deploy`, fails the application's build, so the running replicas — and the model they
serve — are never touched. Without one, the model comes from the deployment's `user_config`
in the Serve config, the path to swap models in place later.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from embeddings.serving import check_model_dir
from services.scoring import ScoringDeployment
from services.served_model import ScoringSettings


class AppArgs(BaseModel):
    """Builder arguments (`args:` in a Serve config, `key=value` after `serve run`).

    Args:
        model_dir: exported model directory; checked now, then passed as user_config.
        version: version answers carry (default: from model.json or the weights' checksum).
        max_rows_per_request: larger requests get 413.
        max_batch_rows: most rows scored in one forward pass.
        batch_wait_timeout_s: how long a batch waits for company (0: never).
        num_replicas: fixed replica count instead of the autoscaling defaults.
    """

    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = None
    version: str | None = None
    max_rows_per_request: int | None = None
    max_batch_rows: int | None = None
    batch_wait_timeout_s: float | None = None
    num_replicas: int | None = Field(None, ge=1)


def user_config(args: AppArgs) -> dict[str, Any] | None:
    """The deployment's user_config for these arguments, validated; None without a model."""
    if args.model_dir is None:
        return None
    fields = args.model_dump(exclude_none=True, exclude={"num_replicas"})
    return ScoringSettings.model_validate(fields).model_dump(exclude_none=True)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The scoring application. Raises ModelFileError when `model_dir` is not servable."""
    parsed = AppArgs.model_validate(args or {})
    options: dict[str, Any] = {}
    config = user_config(parsed)
    if config is not None:
        check_model_dir(config["model_dir"])
        options["user_config"] = config
    if parsed.num_replicas is not None:
        options.update(num_replicas=parsed.num_replicas, autoscaling_config=None)
    return ScoringDeployment.options(**options).bind()


def application_urls(app_name: str) -> dict[str, list[str]]:
    """Base URLs of a running application: {"proxy": [...], "direct": [...]}.

    "direct" lists each replica's own HTTP server when Ray runs with
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1. Serve 2.60 has no public call for these ports, so
    this asks the controller what its proxies are told (`get_target_groups`), the same call
    Ray's own test utilities make; call it from a driver connected to the cluster.
    """
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    http = ray.get(controller.get_http_config.remote())
    local = http.host in ("127.0.0.1", "localhost", "::1")
    host = "127.0.0.1" if local or http.host in ("0.0.0.0", "::") else http.host
    direct = []
    for group in ray.get(controller.get_target_groups.remote(app_name)):
        if group.protocol != RequestProtocol.HTTP:
            continue
        for target in group.targets:
            if target.port != http.port:
                direct.append(f"http://{'127.0.0.1' if local else target.ip}:{target.port}")
    return {"proxy": [f"http://{host}:{http.port}"], "direct": sorted(set(direct))}
