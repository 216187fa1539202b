"""The adapter registry's live-switch rules, with a fake engine behind the seam."""

from __future__ import annotations

import asyncio

import pytest

from serve.adapters import AdapterRegistry
from serve.engine import SamplingOptions
from serve.errors import AdapterLoadError, NoAdapterError
from tests.serve.fakes import FakeEngine, FakeSource


def run(coroutine):
    return asyncio.run(coroutine)


def make(tmp_path, heads):
    engine = FakeEngine()
    source = FakeSource(tmp_path, heads)
    return engine, source, AdapterRegistry(engine, source, refresh_interval_s=0, replica="r0")


async def answer(registry, engine, tenant, tokens=2):
    async with registry.lease(tenant) as ref:
        completion = await engine.complete("q", SamplingOptions(max_tokens=tokens), "req", ref)
    return completion.text


async def hold_old_version(registry, engine, source, tokens=2):
    """acme on v000001, one request held open on it (the engine's gate closed), then HEAD moved to
    v000002; returns the held request's task (it finishes once ``engine.gate`` is set)."""
    await answer(registry, engine, "acme")
    engine.gate = asyncio.Event()
    slow = asyncio.create_task(answer(registry, engine, "acme", tokens=tokens))
    await asyncio.sleep(0.01)  # the slow request holds its lease on v000001
    source.heads["acme"] = "v000002"
    return slow


def test_first_request_loads_head_lazily_and_once(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})

    async def scenario():
        assert registry.current_version("acme") is None
        texts = await asyncio.gather(*(answer(registry, engine, "acme") for _ in range(5)))
        return texts

    texts = run(scenario())
    assert texts == ["acme@v000001:0 acme@v000001:1 "] * 5
    assert source.fetched == [("acme", "v000001")]
    assert [kind for kind, _ in engine.log] == ["add"]


def test_tenant_without_head_is_refused(tmp_path):
    engine, source, registry = make(tmp_path, {})
    with pytest.raises(NoAdapterError, match="acme"):
        run(answer(registry, engine, "acme"))


def test_switch_gives_new_name_id_and_path_then_drops_old(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})

    async def scenario():
        await answer(registry, engine, "acme")
        old = registry.snapshot()["current"]["acme"]
        source.heads["acme"] = "v000002"
        event = await registry.refresh("acme")
        new = registry.snapshot()["current"]["acme"]
        return old, new, event, await answer(registry, engine, "acme")

    old, new, event, text = run(scenario())
    assert (old["lora_name"], new["lora_name"]) == ("acme@v000001", "acme@v000002")
    assert new["lora_int_id"] > old["lora_int_id"]
    assert new["path"] != old["path"]
    assert text.startswith("acme@v000002:0")
    assert event.changed and event.old_version == "v000001" and event.new_version == "v000002"
    assert event.in_flight == 0 and event.dropped_at is not None and event.dropped_at >= event.serving_at
    assert set(engine.adapters) == {new["lora_int_id"]}
    assert not (tmp_path / "acme" / "v000001").exists() and (tmp_path / "acme" / "v000002").exists()
    kinds = [kind for kind, _ in engine.log]
    # new loaded before old removed; nothing else: a switch flushes no prefix cache and preempts no
    # request of any tenant (issue 16; the old version's blocks are unreachable by name and path)
    assert kinds == ["add", "add", "remove"]


def test_in_flight_request_finishes_on_its_version_and_old_is_dropped_after(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})

    async def scenario():
        slow = await hold_old_version(registry, engine, source, tokens=3)
        event = await registry.refresh("acme", wait_dropped=False)
        assert event.in_flight == 1 and event.dropped_at is None
        assert registry.snapshot()["retired"][0]["version"] == "v000001"
        assert (tmp_path / "acme" / "v000001").exists()  # still needed by the running request
        engine.gate.set()
        fresh = await answer(registry, engine, "acme")
        old_text = await slow
        settled = await registry.refresh("acme", timeout=5)
        return fresh, old_text, settled

    fresh, old_text, settled = run(scenario())
    assert old_text == "acme@v000001:0 acme@v000001:1 acme@v000001:2 "
    assert fresh.startswith("acme@v000002")
    assert settled.dropped_at is not None and settled.old_version == "v000001"
    assert registry.snapshot()["retired"] == []
    assert not (tmp_path / "acme" / "v000001").exists()
    assert len(engine.adapters) == 1


def test_refresh_waits_for_drain(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})

    async def scenario():
        slow = await hold_old_version(registry, engine, source)
        refresh = asyncio.create_task(registry.refresh("acme", wait_dropped=True))
        await asyncio.sleep(0.05)
        assert not refresh.done()  # the old version is still leased
        engine.gate.set()
        await slow
        return await refresh

    event = run(scenario())
    assert event.dropped_at is not None and event.in_flight == 1


def test_refresh_timeout_returns_undrained_event(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})

    async def scenario():
        slow = await hold_old_version(registry, engine, source)
        event = await registry.refresh("acme", timeout=0.05)
        engine.gate.set()
        await slow
        return event

    assert run(scenario()).dropped_at is None


def test_unchanged_head_is_a_no_op_that_reports_the_last_switch(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})

    async def scenario():
        await answer(registry, engine, "acme")
        source.heads["acme"] = "v000002"
        first = await registry.refresh("acme")
        again = await registry.refresh("acme")
        return first, again

    first, again = run(scenario())
    assert again == first
    assert [kind for kind, _ in engine.log].count("add") == 2


def test_replica_not_holding_tenant_loads_nothing_on_refresh(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000002"})
    event = run(registry.refresh("acme"))
    assert event.old_version is None and event.new_version == "v000002" and event.dropped_at is not None
    assert engine.log == [] and source.fetched == []


def test_failed_load_keeps_old_version_serving(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})
    engine.fail_add.add("acme@v000002")

    async def scenario():
        await answer(registry, engine, "acme")
        source.heads["acme"] = "v000002"
        with pytest.raises(AdapterLoadError):
            await registry.refresh("acme")
        return await answer(registry, engine, "acme")

    assert run(scenario()).startswith("acme@v000001")
    assert registry.current_version("acme") == "v000001"


def test_tenants_switch_independently(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001", "beta": "v000001"})

    async def scenario():
        await answer(registry, engine, "acme")
        await answer(registry, engine, "beta")
        source.heads["acme"] = "v000002"
        await registry.refresh_all()
        return await answer(registry, engine, "acme"), await answer(registry, engine, "beta")

    acme, beta = run(scenario())
    assert acme.startswith("acme@v000002") and beta.startswith("beta@v000001")
    ids = {ref.name: ref.int_id for ref in engine.adapters.values()}
    assert set(ids) == {"acme@v000002", "beta@v000001"} and len(set(ids.values())) == 2


def test_refresh_loop_picks_up_head_moves(tmp_path):
    engine, source = FakeEngine(), FakeSource(tmp_path, {"acme": "v000001"})
    registry = AdapterRegistry(engine, source, refresh_interval_s=0.02, replica="r0")

    async def scenario():
        registry.start()
        await answer(registry, engine, "acme")
        source.heads["acme"] = "v000002"
        for _ in range(100):
            await asyncio.sleep(0.02)
            if registry.current_version("acme") == "v000002" and not registry.snapshot()["retired"]:
                break
        await registry.stop()
        return registry.current_version("acme")

    assert run(scenario()) == "v000002"
    assert not (tmp_path / "acme" / "v000001").exists()


def test_many_concurrent_requests_across_a_switch_never_touch_a_removed_adapter(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})

    async def scenario():
        async def client(i):
            await asyncio.sleep(0.001 * (i % 7))
            return await answer(registry, engine, "acme", tokens=4)

        tasks = [asyncio.create_task(client(i)) for i in range(60)]
        await asyncio.sleep(0.003)
        source.heads["acme"] = "v000002"
        await registry.refresh("acme", wait_dropped=False)
        source.heads["acme"] = "v000003"
        await registry.refresh("acme", wait_dropped=False)
        texts = await asyncio.gather(*tasks)
        await asyncio.sleep(0.01)
        return texts

    texts = run(scenario())  # FakeEngine asserts its adapter is loaded at every token
    for text in texts:  # each request on exactly one version
        assert len({token.split(":")[0] for token in text.split()}) == 1
    assert [v["version"] for v in registry.snapshot()["current"].values()] == ["v000003"]
    assert registry.snapshot()["retired"] == []
    assert sorted(p.name for p in (tmp_path / "acme").iterdir()) == ["v000003"]


def test_a_tenant_idle_past_the_limit_is_forgotten_and_its_next_request_loads_head_again(tmp_path):
    engine, source = FakeEngine(), FakeSource(tmp_path, {"acme": "v000001", "beta": "v000001"})
    registry = AdapterRegistry(engine, source, refresh_interval_s=0, idle_forget_s=0.05, replica="r0")

    async def scenario():
        await answer(registry, engine, "acme")
        await answer(registry, engine, "beta")
        await asyncio.sleep(0.08)
        engine.gate = asyncio.Event()
        held = asyncio.create_task(answer(registry, engine, "beta"))  # in use now: kept
        await asyncio.sleep(0.01)
        forgotten = await registry.forget_idle()
        state = (registry.current_version("acme"), registry.current_version("beta"))
        engine.gate.set()
        await held
        source.heads["acme"] = "v000002"  # moved while forgotten: the next request serves HEAD
        return forgotten, state, await answer(registry, engine, "acme")

    forgotten, state, text = run(scenario())
    assert forgotten == ["acme"] and state == (None, "v000001")
    assert not (tmp_path / "acme" / "v000001").exists() and (tmp_path / "beta" / "v000001").exists()
    assert text.startswith("acme@v000002")
    assert ("remove", 1) in engine.log


def test_forgetting_is_off_by_default_in_the_registry(tmp_path):
    engine, source, registry = make(tmp_path, {"acme": "v000001"})
    run(answer(registry, engine, "acme"))
    assert run(registry.forget_idle()) == [] and registry.current_version("acme") == "v000001"
