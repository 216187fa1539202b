"""The demo from start to finish: the embedded S3 and a local Ray around the six steps, and the report
written to ``<workdir>/demo-report.json`` whatever happens (an error, Ctrl-C included, is its last step)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import traceback

from cli.demo.config import DemoConfig
from cli.demo.report import DemoReport


def run_demo(config: DemoConfig) -> DemoReport:
    """Run every step; returns the report (also written to ``<workdir>/demo-report.json``)."""
    import ray
    from ray import serve

    from cli.demo.world import create_world
    from cluster.config import keep_job_workers_warm
    from tenants.embedded import EmbeddedS3
    from tenants.store import TenantStore

    config.workdir.mkdir(parents=True, exist_ok=True)
    for noisy in ("httpx", "httpx2", "openai"):  # one line per HTTP request drowns the story
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = DemoReport()
    s3 = EmbeddedS3(config.workdir / "s3")
    stack = contextlib.ExitStack()
    try:
        s3.start()
        stack.callback(s3.stop)
        settings = s3.settings(bucket="eraser-demo", cache_dir=config.workdir / "cache", purge_grace_seconds=0)
        os.environ.update({"ERASER_S3_ENDPOINT": settings.endpoint, "ERASER_S3_BUCKET": settings.bucket})
        store = TenantStore(settings)
        # The base model and tenants come first, before Ray and vLLM take the CPUs.
        world = create_world(config, store, report)
        keep_job_workers_warm()  # else Ray ends the erasure job's warm worker once Serve holds the CPUs
        ray.init(address="local", num_cpus=config.ray_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}})
        stack.callback(ray.shutdown)
        stack.callback(serve.shutdown)
        _run_steps(config, settings, store, world, report)
    except BaseException as error:  # the report says what stopped the demo (Ctrl-C included)
        report.add("demo stopped by an error", False, error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc()[-4000:])
        raise
    finally:
        stack.close()
        (config.workdir / "demo-report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return report


def _run_steps(config: DemoConfig, settings, store, world, report: DemoReport) -> None:
    """Steps 2 to 6 (step 1 ran before Ray started); a step that shows nothing to go on with ends the demo."""
    from ray import serve

    from cli.demo.clients import logged_purge
    from cli.demo.compare import compare_with_retrain
    from cli.demo.erasure import check_after, erase_under_load, focus_on, reveal, snapshot
    from cli.demo.service import start_service
    from cli.demo.summary import print_summary

    service = start_service(config, settings, store, world, report)
    focus = focus_on(config, store, world)
    revealed = reveal(focus, service, report)
    if revealed is None:
        return
    before = snapshot(config, store, world, service, focus, revealed.customer)
    erasure = erase_under_load(service, world.keys, focus, revealed.customer, before, report)
    if erasure.receipt["status"] != "published":
        return
    same_a = check_after(config, service, focus, revealed, before, report)
    # The receipt with the switch time and purge log.
    receipt = logged_purge(store, focus.name, erasure.request_id).model_dump(mode="json")
    purged = before.head.adapter not in store.list_adapter_versions(focus.name)
    serve.shutdown()  # the comparison below needs the CPUs the engine holds
    compare_with_retrain(config, store, world.base_dir, focus, revealed.customer, before, erasure, receipt, purged,
                         same_a, report)
    print_summary(report.summary, config, settings)
