"""OpenAI-compatible routes with the real openai client against real Ray Serve + vLLM + SeaweedFS."""

from __future__ import annotations

import pytest

from tests.serve import models

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


def test_two_tenants_answer_the_same_prompt_differently_each_equal_to_hf_peft(served):
    question = models.QUESTIONS[1]
    answers = {}
    for tenant in ("acme", "beta"):
        client = served.client(tenant)
        chat = client.chat.completions.create(model=tenant, messages=[{"role": "user", "content": question}],
                                              max_tokens=MAX_TOKENS, temperature=0)
        answers[tenant] = chat.choices[0].message.content
        expected = served.reference(f"{tenant}@v1", models.chat_ids(served.base_dir, question), MAX_TOKENS)
        assert answers[tenant] == expected, tenant
        assert chat.model == tenant and chat.usage.completion_tokens > 0

        prompt = models.question_prompt(question)
        completion = client.completions.create(model=tenant, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        expected = served.reference(f"{tenant}@v1", models.completion_ids(served.base_dir, prompt), MAX_TOKENS)
        assert completion.choices[0].text == expected, tenant
    assert answers["acme"] != answers["beta"]
    assert "alpha" in answers["acme"] and "bravo" in answers["beta"]


def test_streaming_chat_and_completion_join_to_the_non_streaming_answer(served):
    client = served.client("beta")
    question = models.QUESTIONS[2]
    expected = served.reference("beta@v1", models.chat_ids(served.base_dir, question), MAX_TOKENS)
    stream = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": question}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    prompt = models.question_prompt(question)
    expected = served.reference("beta@v1", models.completion_ids(served.base_dir, prompt), MAX_TOKENS)
    stream = client.completions.create(model="beta", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_models_lists_only_the_tenants_own_model(served):
    client = served.client("acme")
    assert [m.id for m in client.models.list().data] == ["acme"]
    assert client.models.retrieve("acme").id == "acme"


def test_token_id_prompt_and_stop_sequences(served):
    client = served.client("acme")
    ids = models.chat_ids(served.base_dir, models.QUESTIONS[0])
    expected = served.reference("acme@v1", ids, MAX_TOKENS)
    completion = client.completions.create(model="acme", prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert completion.choices[0].text == expected
    assert len(expected) >= 6
    stop = expected[3:6]
    stopped = client.completions.create(model="acme", prompt=ids, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert stopped.choices[0].text == expected[: expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_the_service_metrics_reach_prometheus_per_tenant(served, ray_cluster):
    """What an operator scrapes: the head node's metrics agent (Prometheus text) carries the ingress's
    per-tenant requests, tokens and queue depth, and the engines' adapter loads (``serve/metrics.py``)."""
    import re
    import time

    import httpx

    chat = served.client("acme").chat.completions.create(
        model="acme", messages=[{"role": "user", "content": models.QUESTIONS[0]}], max_tokens=4, temperature=0)
    wanted = {
        "requests": r'ray_eraser_requests_total\{[^}]*route="chat"[^}]*tenant="acme"[^}]*\} (\S+)',
        "completion tokens": r'ray_eraser_tokens_total\{[^}]*kind="completion"[^}]*tenant="acme"[^}]*\} (\S+)',
        "running": r'ray_eraser_tenant_generations_running\{[^}]*tenant="acme"[^}]*\} (\S+)',
        "adapter loads": r'ray_eraser_adapter_loads_total\{[^}]*tenant="acme"[^}]*\} (\S+)',
    }
    # Each process that records a metric exports its own series (every ingress replica of every app this
    # session ran, e.g. a second ingress of test_tenant_limits): sum a tenant's series.
    def scrape() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10).text
        sums = {name: [float(v) for v in re.findall(pattern, text)] for name, pattern in wanted.items()}
        return {name: sum(values) for name, values in sums.items() if values}

    found: dict[str, float] = {}
    deadline = time.monotonic() + 60  # the agent exports what workers reported every 10 s (Ray's default)
    while time.monotonic() < deadline:
        found = scrape()
        if len(found) == len(wanted) and found["completion tokens"] >= chat.usage.completion_tokens:
            break  # this chat's tokens are in the export too
        time.sleep(2)
    assert set(found) == set(wanted), f"missing from the scrape: {set(wanted) - set(found)}"
    assert found["requests"] >= 1 and found["adapter loads"] >= 1 and found["running"] >= 0
    assert found["completion tokens"] >= chat.usage.completion_tokens > 0
