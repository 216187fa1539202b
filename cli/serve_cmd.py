"""`eraser serve`: run the service (Ray Serve + vLLM, OpenAI-compatible API, erasure API) in the foreground.

Embedded defaults: a local Ray (unless --address or RAY_ADDRESS names a cluster) and, when no
ERASER_S3_ENDPOINT is set, an embedded SeaweedFS with its data in --data-dir, both for as long as
the command runs. The same application deploys on a cluster with
``serve deploy serve/serve_config.yaml`` or ``serve run serve.app:build_app``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

from cli.store_args import add_data_dir_argument, open_cli_store, serve_store_args

BACKENDS = {
    "cluster": "serve.backend:cluster_backend",
    "local": "serve.backend:local_cluster_backend",
    "none": None,
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible serving + erasure service",
        description="Serve every tenant's current adapter over one base model with vLLM in Ray Serve "
        "(OpenAI routes /v1/completions, /v1/chat/completions, /v1/models; erasure routes "
        "/v1/tenants/{t}/erasures; admin routes /v1/admin/...). Uses ERASER_S3_ENDPOINT when set, "
        "else an embedded SeaweedFS in --data-dir.",
    )
    parser.add_argument("--config", type=Path, help="ServeConfig YAML (or a Serve config whose application args hold it)")
    parser.add_argument("--model", help="base model: a model name in the store or a local HF directory")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    add_data_dir_argument(parser)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: this machine's)")
    parser.add_argument("--engine-replicas", type=int, help="vLLM engine replicas (default 1)")
    parser.add_argument("--max-loras", type=int, help="adapters per batch (default 4)")
    parser.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory (default 16)")
    parser.add_argument("--max-lora-rank", type=int, help="largest LoRA rank served (default 16)")
    parser.add_argument("--refresh-interval", type=float, help="seconds between HEAD polls per replica (default 5)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default=None,
                        help="who executes erasures: cluster (coordinator actors, Ray Train), local (in the "
                        "ingress process), none (record only); default: the config's, else cluster on a Ray "
                        "cluster (--address) and local on the embedded local Ray (whose CPUs the engine holds)")
    parser.set_defaults(handler=run_serve)


def config_from_args(args: argparse.Namespace, store: dict[str, Any] | None = None):
    """The ServeConfig for these arguments: --config, then flags, then ERASER_SERVE_* for the rest."""
    import yaml

    from serve.config import ServeConfig

    data: dict[str, Any] = {}
    if args.config is not None:
        loaded = yaml.safe_load(args.config.read_text()) or {}
        data = (loaded.get("applications") or [{}])[0].get("args") or {} if "applications" in loaded else loaded
    engine = dict(data.get("engine") or {})
    for flag, field in (("model", "model"), ("max_loras", "max_loras"), ("max_cpu_loras", "max_cpu_loras"),
                        ("max_lora_rank", "max_lora_rank")):
        if getattr(args, flag) is not None:
            engine[field] = getattr(args, flag)
    if engine:
        data["engine"] = engine
    if args.engine_replicas is not None:
        data["engine_replicas"] = args.engine_replicas
    if args.refresh_interval is not None:
        data["refresh_interval_s"] = args.refresh_interval
    if args.backend is not None:
        data["erasure_backend"] = BACKENDS[args.backend]
    elif "erasure_backend" not in data and not os.environ.get("ERASER_SERVE_ERASURE_BACKEND"):
        on_cluster = bool(getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"))
        data["erasure_backend"] = BACKENDS["cluster" if on_cluster else "local"]
    if store:
        data["store"] = {**store, **(data.get("store") or {})}
    return ServeConfig.from_args(data)


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.config import keep_job_workers_warm
    from serve.app import build_app
    from tenants.keys import ADMIN_KEY_ENV

    with open_cli_store(args) as store:
        settings = store.settings
        config = config_from_args(args, serve_store_args(settings))
        admin_key = None if os.environ.get(ADMIN_KEY_ENV) else store.ensure_admin_key()

        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            keep_job_workers_warm()  # this node serves and runs erasure jobs: keep a job worker warm
            ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False)
        try:
            serve.start(http_options={"host": args.host, "port": args.port})
            serve.run(build_app(config), name=config.app_name, route_prefix="/")
            url = f"http://{args.host}:{args.port}"
            print(f"eraser: serving {config.engine.model} at {url}/v1 (store {settings.describe()})")
            if admin_key:
                print(f"eraser: admin key (shown once): {admin_key}")
            print("eraser: Ctrl-C to stop")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0
