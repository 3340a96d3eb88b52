"""`deltaray serve ...`: run the endpoint locally, deploy it to a remote Ray cluster, or print
the Serve config a RayService needs.

    deltaray serve run [CONFIG.yaml] [--model PATH|preset:NAME] [--host H] [--port P] [--api-key-env VAR]
    deltaray serve deploy CONFIG.yaml --address http://HEAD:8265
    deltaray serve config CONFIG.yaml
"""
from __future__ import annotations

import os
import time

import yaml
from pydantic import ValidationError

from cluster.serve_config import ServeConfig


def load_config(path: str | None, **overrides) -> ServeConfig:
    """The config file (or defaults) with command-line overrides; errors as one line."""
    try:
        config = ServeConfig.from_yaml(path) if path else ServeConfig()
        changes = {k: v for k, v in overrides.items() if v is not None}
        return ServeConfig.model_validate({**config.model_dump(), **changes}) if changes else config
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"serve config: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def cmd_serve_run(args) -> None:
    import ray
    from ray import serve

    from cluster.serve_app import build_app
    config = load_config(args.config, model=args.model, host=args.host, port=args.port,
                         api_key_env=args.api_key_env)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")   # never a stale /tmp/ray one
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
        print(f"serving {config.model_name!r} at http://{config.host}:{config.port}"
              f"{config.route_prefix.rstrip('/')}/v1 (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def cmd_serve_deploy(args) -> None:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    config = load_config(args.config)
    ServeSubmissionClient(args.address).deploy_applications(config.to_serve_config())
    print(f"deployed {config.name!r} ({config.model_name}) to {args.address}")


def cmd_serve_config(args) -> None:
    print(yaml.safe_dump(load_config(args.config).to_serve_config(), sort_keys=False), end="")


def add_serve_commands(sub) -> None:
    serve = sub.add_parser("serve", help="the OpenAI-compatible endpoint (Ray Serve)")
    serve_sub = serve.add_subparsers(dest="serve_command", required=True)
    run = serve_sub.add_parser("run", help="serve on a local Ray cluster until Ctrl-C")
    run.add_argument("config", nargs="?", help="serve config YAML")
    run.add_argument("--model", help="checkpoint directory or preset:NAME")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.add_argument("--api-key-env", help="environment variable holding the API keys")
    run.set_defaults(func=cmd_serve_run)
    deploy = serve_sub.add_parser("deploy", help="deploy to a remote Ray cluster")
    deploy.add_argument("config")
    deploy.add_argument("--address", required=True, help="dashboard address, http://HEAD:8265")
    deploy.set_defaults(func=cmd_serve_deploy)
    config = serve_sub.add_parser("config", help="print the Serve config for a RayService")
    config.add_argument("config")
    config.set_defaults(func=cmd_serve_config)
