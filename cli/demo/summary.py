"""The demo's closing summary: the table of what the erasure did against a retrain, and where everything lives."""

from __future__ import annotations

from cli.demo.config import DemoConfig
from cli.demo.report import say


def erasure_breakdown(stages: dict, request_to_live_s: float) -> list[tuple[str, str]]:
    """Where the request-to-live time went, from the receipt's stages: the method itself (what the
    retrain compares with) and the service around it (job launch, model load, S3 publish, switch)."""
    if not stages:
        return []
    method = [("influence", "influence_s"), ("verification", "verify_s"), ("remediation", "remediation_s"),
              ("retrain fallback", "retrain_s")]  # influence_s includes the damping search
    load = [("imports", "load_imports_s"), ("base files", "load_base_files_s"), ("tenant files", "load_tenant_files_s"),
            ("base", "load_base_model_s"), ("adapter", "load_adapter_s")]  # cluster.jobs._load_version's laps
    method_s = sum(stages.get(key, 0.0) for _, key in method)
    service_s = max(0.0, request_to_live_s - method_s)
    return [
        ("  the method", f"{method_s:.1f} s (" + _parts(method, stages) + ")"),
        ("  the service around it", f"{service_s:.1f} s (model load {stages.get('load_s', 0.0):.1f}: "
                                    f"{_parts(load, stages)}; publish {stages.get('publish_s', 0.0):.1f}, switch "
                                    f"{stages.get('notify_s', 0.0):.1f}, the rest job launch, queueing and polling)"),
    ]


def _parts(parts: list[tuple[str, str]], stages: dict) -> str:
    return ", ".join(f"{name} {stages[key]:.1f}" for name, key in parts if key in stages)


def print_summary(summary: dict, config: DemoConfig, settings) -> None:
    rows = [
        ("customer erased", f"{summary['customer']} ({summary['records_erased']} records)"),
        ("path that produced the adapter", summary["path"]),
        ("adapter's low-rank curvature", summary.get("curvature_cache") or "not used"),
        ("erasure, request to live on every replica", f"{summary['erase_s']:.1f} s "
                                                       f"(the retrain below takes "
                                                       f"{summary['retrain_s'] / summary['erase_s']:.1f}x as long)"),
        *erasure_breakdown(summary.get("erase_stages") or {}, summary["erase_s"]),
        ("retrain from scratch (for comparison)", f"{summary['retrain_s']:.1f} s (training only, all CPUs: "
                                                  "the service is stopped by then)"),
        ("NLL of erased records: before / after / gold",
         f"{summary['nll_erased_before']:.3f} / {summary['nll_erased_after']:.3f} / {summary['nll_erased_gold']:.3f}"),
        ("NLL of never-trained (held-out) records", f"{summary['nll_heldout_after']:.3f}"),
        ("NLL of other customers' records: before / after / gold", "{before:.3f} / {after:.3f} / {gold:.3f}".format(
            **summary["nll_other_customers"])),
        ("erased customer's questions: erased vs retrained", "; ".join(
            f"{row['erased'][:40]!r} vs {row['retrained'][:40]!r}" for row in summary["erased_questions"][:2])),
        ("answers about other customers kept verbatim", "{erased}/{probes} (retrain from scratch: {gold}/{probes})".format(
            **summary["other_answers_kept"])),
        ("requests served during the switch", f"{summary['served_during_switch']} ({summary['failed_during_switch']} failed)"),
        ("adapter versions", f"{summary['adapter_before']} -> {summary['adapter_after']} "
                             f"({'old one purged from S3' if summary['old_version_purged_from_s3'] else 'old one kept'})"),
    ]
    width = max(len(name) for name, _ in rows)
    say("\n== summary")
    for name, value in rows:
        say(f"   {name.ljust(width)}  {value}")
    say("\n== where everything lives")
    say(f"   work directory     {config.workdir}")
    say(f"   S3 (SeaweedFS)     {settings.endpoint} bucket {settings.bucket} (data in {config.workdir / 's3'})")
    say(f"   base model         {config.workdir / 'base'}")
    say(f"   report             {config.workdir / 'demo-report.json'}")
