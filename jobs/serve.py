"""`python -m jobs.serve --model DIR`: serve an exported model locally on Ray Serve.

The same application as `serve run deploy/serve.yaml` (`services.app.build_app`), started
with what a local user needs checked first: the model directory (model.json, weights,
checksum) and the ports, each failing with a message rather than a Ray traceback. With
`--direct-ingress` it starts Ray with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 — only honoured
when set before Ray starts — so the replica answers on its own port, without the proxy hop.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

APP_NAME = "embpress"
LOG_LEVEL_ENV = "EMBPRESS_LOG_LEVEL"  # as the training jobs read it (`training.run`)
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DIRECT_PORT_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
DIRECT_PORT_MAX_ENV = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
# Serve keeps a direct-ingress replica draining 30 s by default so that load balancers notice
# it going; a local server has none, and Ctrl-C should not take half a minute.
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAIN_S = "2"
# Serve runs user code on an event loop of its own thread by default, so every request hops
# threads (and the GIL) twice between the loop that reads HTTP and the one that scores.
# Scoring awaits nothing but the batch, and loading a model runs off the loop, so one loop
# serves as well: measured here, ~10% less replica CPU a request, 1-row and 256-row alike.
USER_CODE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
# End-to-end limit Serve puts on a request (its `request_timeout_s`, answered 408); the body
# itself has a shorter deadline (services.guard).
REQUEST_TIMEOUT_S = 60.0

DESCRIPTION = """\
Serve an exported embpress model (model.json + weights.safetensors, written by
python -m jobs.train or python -m jobs.export) on Ray Serve, and block until Ctrl-C.

Routes: POST /v1/score, GET /healthz, GET /readyz, GET /v1/model, /openapi.json; docs at
/docs unless a token is set (EMBPRESS_DOCS=on|off decides).
Authentication: set EMBPRESS_API_TOKEN (or EMBPRESS_API_TOKEN_FILE) in this command's
environment; the replicas inherit it.
"""

EPILOG = """\
examples:
  python -m jobs.serve --model runs/small_synthetic/model
  python -m jobs.serve --model runs/small_synthetic/model --direct-ingress   # lowest latency
  python -m jobs.serve --check runs/small_synthetic/model                    # check, then exit
  RAY_ADDRESS=auto python -m jobs.serve --urls      # the running app's proxy and direct URLs
"""


class ServeStartError(RuntimeError):
    """The service cannot start; the message says why and what to do."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.serve", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="DIR", help="exported model directory to serve")
    what.add_argument("--check", metavar="DIR",
                      help="check a model directory (files, checksum, loads) and exit")
    what.add_argument("--urls", action="store_true",
                      help="print the running application's URLs, one per line (the "
                           "direct-ingress port changes when a replica is replaced) and exit")
    parser.add_argument("--app", default=APP_NAME,
                        help="Serve application name (default: %(default)s)")
    parser.add_argument("--version", help="version answers carry (default: model.json's, "
                                          "else the weights' checksum)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000,
                        help="HTTP port of the Serve proxy (default: %(default)s)")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="let the replica answer on its own port too (p50 ~2 ms instead "
                             "of ~10 ms through the proxy); needs this command to start Ray")
    parser.add_argument("--direct-port", type=int, default=30000,
                        help="first port replicas listen on with --direct-ingress "
                             "(default: %(default)s)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="replicas (default: %(default)s; 0: autoscale 1-4)")
    parser.add_argument("--max-rows-per-request", type=int, default=None, metavar="N",
                        help="requests with more rows get 413 (default: 4096)")
    parser.add_argument("--num-cpus", type=int, default=None, metavar="N",
                        help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--wait-for-resources", type=float, default=0.0, metavar="S",
                        help="on a cluster that adds nodes on demand, wait up to S seconds "
                             "for CPUs for every replica (default: refuse at once)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Serve's INFO lines (endpoint updates, replica "
                             "changes); the same as EMBPRESS_LOG_LEVEL=INFO")
    return parser


def check_model(directory: str) -> dict[str, Any]:
    """model.json of a servable directory (files, checksum, and a real load); else raise."""
    from embeddings.serving import ModelFileError
    from services.served_model import ScoringSettings, load_for_serving

    try:
        loaded = load_for_serving(ScoringSettings(model_dir=str(Path(directory).resolve())))
    except ModelFileError as exc:
        raise ServeStartError(str(exc)) from None
    except Exception as exc:  # shapes that disagree with model.json, a bad config, …
        reason = " ".join(str(exc).split())  # state_dict errors span many lines
        if len(reason) > 300:
            reason = f"{reason[:300]}… ({len(reason):,} characters)"
        raise ServeStartError(f"{directory}: cannot load the model: {type(exc).__name__}: "
                              f"{reason}") from None
    return {**loaded.document, "version": loaded.version}


def check_port(host: str, port: int, what: str) -> None:
    """Refuse a port another process holds, before Ray starts and fails less clearly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeStartError(
                    f"{what} port {port} on {host} is already in use (another server, or an "
                    f"earlier run still up?); choose another with --port/--direct-port or "
                    f"stop it (`serve shutdown`)") from None
            raise ServeStartError(f"cannot listen on {host}:{port}: {exc}") from None


def start_service(args: argparse.Namespace) -> tuple[dict[str, list[str]], bool]:
    """Start Ray (if needed) and Serve, deploy, and return the URLs; True if Ray was started."""
    joining = bool(os.environ.get("RAY_ADDRESS"))
    # Slow-upload guard and uvicorn settings in the proxy and direct-ingress servers; read
    # by those processes as they start, so set before ray.init like the flags below.
    from services.guard import CALLBACK, CALLBACK_ENV

    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    if args.direct_ingress:
        if joining:
            print(f"serve: note: joining RAY_ADDRESS's cluster; direct ingress works only if "
                  f"that cluster was started with {DIRECT_INGRESS_ENV}=1", file=sys.stderr)
        # Read by the Serve controller and replicas when they start: must be in the
        # environment Ray starts them with, i.e. before ray.init.
        os.environ[DIRECT_INGRESS_ENV] = "1"
        # Serve hands replicas ports from MIN to MAX (default 30000-31000): both move with
        # --direct-port, or a port above 31000 would leave no range at all.
        os.environ[DIRECT_PORT_ENV] = str(args.direct_port)
        os.environ[DIRECT_PORT_MAX_ENV] = str(args.direct_port + 1000)
        if not joining:
            os.environ.setdefault(DRAIN_ENV, LOCAL_DRAIN_S)
    import ray
    from ray import serve

    from services.app import application_urls, build_app

    started = False
    if not ray.is_initialized():
        if joining:
            ray.init()
        else:
            os.environ.setdefault(USER_CODE_THREAD_ENV, "0")  # read by replicas as they start
            ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False)
        started = True
    app_args: dict[str, Any] = {"model_dir": str(Path(args.model).resolve())}
    if args.version:
        app_args["version"] = args.version
    if args.max_rows_per_request:
        app_args["max_rows_per_request"] = args.max_rows_per_request
        app_args["max_batch_rows"] = max(8192, args.max_rows_per_request)
    if args.replicas:
        app_args["num_replicas"] = args.replicas
    from jobs.preflight import check_replicas
    from services.scoring import REPLICA_CPUS
    from training.preflight import ResourcesUnavailable

    try:
        # Autoscaling (--replicas 0) starts at one replica.
        check_replicas(args.replicas or 1, REPLICA_CPUS, args.wait_for_resources)
    except ResourcesUnavailable as exc:
        if started:
            ray.shutdown()
        raise ServeStartError(str(exc)) from None
    # Serve's controller and proxy narrate every endpoint update and replica change at
    # INFO; a user starting a server wants its URLs and errors. The replicas' own lines
    # (model loaded, auth) stay. --verbose or EMBPRESS_LOG_LEVEL=INFO brings them back.
    level = os.environ.get(LOG_LEVEL_ENV, "WARNING").upper()
    logging.getLogger("ray.serve").setLevel(level)
    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": REQUEST_TIMEOUT_S},
                logging_config={"log_level": level})
    serve.run(build_app(app_args), name=args.app, route_prefix="/")
    return application_urls(args.app), started


def print_urls(app_name: str = APP_NAME) -> int:
    """The running application's URLs (proxy first), for clients of the direct path."""
    import ray

    from services.app import application_urls

    try:
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        from ray import serve

        running = serve.status().applications
        if app_name not in running:
            raise LookupError(f"no such application; running: {sorted(running) or 'none'}")
        urls = application_urls(app_name)
    except Exception as exc:  # no cluster, no Serve, no such app
        print(f"serve: error: cannot read the URLs of {app_name!r}: {type(exc).__name__}: "
              f"{' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 2
    for url in urls["proxy"] + urls["direct"]:
        print(url)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[LOG_LEVEL_ENV] = "INFO"
    if args.urls:
        return print_urls(args.app)
    try:
        document = check_model(args.check or args.model)
        if args.check:
            print(f"{args.check}: servable; version {document['version']}, "
                  f"{len(document['features'])} categorical features, d="
                  f"{document['embedding_dim']}, {document['serving_bytes']['embeddings']:,} "
                  "bytes of embeddings")
            return 0
        if not 1 <= args.port <= 65535 or not 1 <= args.direct_port <= 64535:
            raise ServeStartError("--port must be in 1-65535 and --direct-port in 1-64535")
        check_port(args.host, args.port, "proxy")
        if args.direct_ingress:
            check_port(args.host, args.direct_port, "direct-ingress")
        urls, started = start_service(args)
    except ServeStartError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    base = (urls["direct"] or urls["proxy"])[0]
    print(f"serving {args.model} (version {document['version']})")
    print(f"  through the Serve proxy: {urls['proxy'][0]}")
    for url in urls["direct"]:
        print(f"  direct to a replica:     {url}   (recommended: lowest latency)")
    print(f"  try: curl -s {base}/readyz ; API at {base}/openapi.json ; Ctrl-C stops")
    # SIGTERM (a container stop) takes the same clean way out as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        from ray import serve

        serve.shutdown()
        if started:
            import ray

            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
