"""Step 6: compare the erased adapter with one retrained from scratch without the customer (the gold
standard an erasure approximates): NLL of the erased records and of the other customers, greedy answers
kept word for word, the erased customer's questions side by side. Fills the report's summary.

Runs after the service is stopped: the retrain needs the CPUs the engine holds.
"""

from __future__ import annotations

import time

from cli.demo.config import DemoConfig
from cli.demo.erasure import Before, Erasure, Focus
from cli.demo.report import DemoReport, say, stage


def compare_with_retrain(config: DemoConfig, store, base_dir, focus: Focus, customer: str, before: Before,
                         erasure: Erasure, receipt: dict, purged: bool, same_a: int, report: DemoReport) -> None:
    from cluster.jobs import train_config
    from eraser.model import load_adapter, load_base
    from eraser.pipeline import PipelineConfig
    from eraser.records import per_record_losses
    from eraser.training import add_lora, train_lora

    a, tokenizer, erased = focus.name, focus.tokenizer, before.erased
    with stage(f"6. compare with an adapter retrained from scratch without {customer!r}"):
        recipe = train_config(focus.config)
        others = [r for r in focus.train if r.subject != customer]
        started = time.perf_counter()
        gold = add_lora(load_base(base_dir), recipe)
        train_lora(gold, tokenizer, others, recipe)
        retrain_s = time.perf_counter() - started
        head_after, _ = store.get_head(a)
        original = load_adapter(load_base(base_dir), before.original_dir)
        erased_model = load_adapter(load_base(base_dir), store.download_adapter(a, head_after.adapter))
        models = (("before", original), ("after", erased_model), ("gold", gold))
        nll = {name: float(per_record_losses(model, erased, tokenizer).mean()) for name, model in models}
        heldout_nll = float(per_record_losses(erased_model, focus.heldout, tokenizer).mean())
        nll_others = {name: float(per_record_losses(model, others, tokenizer).mean()) for name, model in models}
        bound = PipelineConfig().retained_bound(nll_others["before"])
        kept = answers_kept(others, tokenizer, {"erased": erased_model, "gold": gold}, original)
        side_by_side = answers_side_by_side(erased, tokenizer, {"erased": erased_model, "retrained": gold})
        for row in side_by_side[:4]:
            say(f"   Q: {row['question']}\n   erased:    {row['erased']}\n   retrained: {row['retrained']}")
        say(f"   {a}'s other customers: NLL {nll_others['before']:.3f} -> {nll_others['after']:.3f} "
            f"(bound {bound:.3f}; retrain {nll_others['gold']:.3f}); greedy answers kept word for word: "
            f"{kept['erased']}/{kept['probes']} (retrain {kept['gold']}/{kept['probes']})")
        report.add(f"{a}'s other customers are still known (NLL within the guard's bound)",
                   nll_others["after"] <= bound, nll=nll_others, bound=bound, answers_kept=kept,
                   unchanged_through_api=same_a, api_probes=len(before.answers_others))
        stages = receipt.get("stages") or {}
        report.summary = {
            "customer": customer, "records_erased": len(erased), "path": receipt.get("path"),
            "curvature_cache": (receipt.get("solver") or {}).get("curvature_cache"),
            "erase_s": erasure.seconds, "erase_job_s": stages.get("job_s"), "retrain_s": retrain_s,
            "erase_stages": {k: v for k, v in stages.items() if isinstance(v, (int, float))},
            "nll_erased_before": nll["before"], "nll_erased_after": nll["after"], "nll_erased_gold": nll["gold"],
            "nll_heldout_after": heldout_nll, "nll_other_customers": nll_others, "other_answers_kept": kept,
            "served_during_switch": erasure.served, "failed_during_switch": erasure.failed,
            "adapter_before": before.head.adapter, "adapter_after": head_after.adapter,
            "replicas_switched_at": receipt.get("replicas_switched_at"), "old_version_purged_from_s3": purged,
            "erased_questions": side_by_side,
        }
        # The retrain is the target: the erasure must have moved the erased records' NLL towards it.
        moved = (nll["after"] - nll["before"]) * (nll["gold"] - nll["before"]) > 0
        report.add("the erased records' NLL moved towards the retrained adapter's", moved, nll=nll)


def answers_kept(others: list, tokenizer, candidates: dict, original, probes: int = 24) -> dict:
    """How many of ``probes`` questions about customers who were not erased each candidate adapter answers
    word for word as the original did (greedy). Any change of the weights moves some greedy answers; a retrain
    without the customer is the reference for how many an erasure may move."""
    from eraser.metrics import greedy_answers

    questions = [r.prompt_messages() for r in others[:: max(1, len(others) // probes)][:probes]]
    before = greedy_answers(original, tokenizer, questions, max_new_tokens=40)
    kept = {name: sum(a == b for a, b in zip(before, greedy_answers(model, tokenizer, questions, max_new_tokens=40)))
            for name, model in candidates.items()}
    return {**kept, "probes": len(questions)}


def answers_side_by_side(records: list, tokenizer, models: dict) -> list[dict]:
    """Greedy answers of each model to the erased records' questions (the retrain's next to the erasure's:
    fluent where a retrain is fluent, and giving back none of the erased data)."""
    from eraser.metrics import greedy_answers

    asks = [r.prompt_messages() for r in records]
    answers = {name: greedy_answers(model, tokenizer, asks, max_new_tokens=40) for name, model in models.items()}
    return [{"question": r.prompt, **{name: answers[name][i] for name in models}} for i, r in enumerate(records)]
