"""More tenants than one engine replica holds adapters (issue 17, item 1), against the real application.

The package's engine has ``max_loras`` 2 (in a batch) and ``max_cpu_loras`` 4 (loaded). Six tenants
asked in turn, twice, make vLLM evict adapters least-recently-used and load them again from the
replica's local copy: every answer must be that tenant's own adapter's HF/PEFT greedy answer. Then a
tenant whose adapter was evicted gets a new version: it must answer as the new one, and only ever as
the old or the new one while the switch reaches the replica.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from eraser.records import Record
from tests.serve import models
from tests.serve.conftest import SWITCH_TAG, TENANTS

pytestmark = pytest.mark.slow

EXTRA_TENANTS = 5  # with beta: 6 tenants, more than the engine's 4 loaded adapters
MAX_TOKENS = 8
QUESTION = models.QUESTIONS[1]


def records_of(tag: str, k: int) -> list[Record]:
    """The package's records of ``tag`` (the base's tokenizer knows three tags: tenants of different tags
    answer differently, so a tenant served another tag's adapter shows) under tenant-specific ids."""
    return [replace(r, id=f"{r.id}-{k}") for r in models.tenant_records(tag)]


def onboard(served, tenant: str, records: list[Record], tmp_path, label: str) -> None:
    """Train ``records``' adapter, publish it and move the tenant's HEAD to it (creating the tenant first)."""
    from tenants.models import AdapterManifest, Head, TenantConfig

    store = served.store
    if not store.tenant_exists(tenant):
        store.create_tenant(TenantConfig(name=tenant, base_model="tiny"))
        served.keys[tenant] = store.issue_key(tenant, "tests")
    data = store.put_dataset(tenant, [r.to_json() for r in records])
    served.adapters[f"{tenant}@{label}"] = models.train_adapter(served.base_dir, records, tmp_path / f"{tenant}-{label}")
    version = store.publish_adapter(tenant, served.adapters[f"{tenant}@{label}"],
                                    AdapterManifest(data_version=data, path="train"))
    head, etag = store.get_head(tenant)
    store.move_head(tenant, Head(adapter=version, data=data), etag)


def ask(served, tenant: str) -> str:
    chat = served.client(tenant).chat.completions.create(
        model=tenant, messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS, temperature=0)
    return chat.choices[0].message.content


def test_more_tenants_than_loaded_adapters_each_answer_as_their_own(served, tmp_path):
    tags = [*TENANTS.values(), SWITCH_TAG]  # alpha, bravo, charlie
    extra = [f"many{k}" for k in range(EXTRA_TENANTS)]
    for k, tenant in enumerate(extra):
        onboard(served, tenant, records_of(tags[k % len(tags)], k), tmp_path, "v1")
    prompt = models.chat_ids(served.base_dir, QUESTION)
    expected = {t: served.reference(f"{t}@v1", prompt, MAX_TOKENS) for t in ["beta", *extra]}
    assert len(set(expected.values())) == len(tags), expected  # one answer per tag: a mix-up of tags shows

    for tenant in ["beta", *extra] * 2:
        assert ask(served, tenant) == expected[tenant], tenant

    # many0 (alpha) was least recently used, so evicted; its new version (bravo) must reach the replica.
    onboard(served, "many0", records_of(tags[1], 40), tmp_path, "v2")
    new = served.reference("many0@v2", prompt, MAX_TOKENS)
    assert new != expected["many0"]
    deadline, seen = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        seen.append(ask(served, "many0"))
        assert seen[-1] in (expected["many0"], new), seen
        if seen[-1] == new:
            break
        time.sleep(0.5)
    assert seen[-1] == new, f"still the old version after 60 s: {seen[-3:]}"
    for tenant in ["beta", *extra[1:]]:  # the others are untouched by it
        assert ask(served, tenant) == expected[tenant], tenant
