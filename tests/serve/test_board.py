"""The adapter board without Ray: change feed, reports, and what publish waits for."""

from __future__ import annotations

import asyncio

from serve.board import ALL, MAX_CHANGES, AdapterBoard


def run(coroutine):
    return asyncio.run(coroutine)


def event(tenant, replica, new, dropped_at=1.0, started_at=None):
    import time

    return {"tenant": tenant, "replica": replica, "old_version": "v000001", "new_version": new,
            "started_at": started_at or time.time(), "serving_at": 0.5, "dropped_at": dropped_at, "in_flight": 0}


def test_watch_returns_changed_tenants_and_publish_waits_for_every_live_replica():
    async def scenario():
        board = AdapterBoard(watch_timeout_s=5)
        for replica in ("r1", "r2"):
            assert await board.watch(replica, -1) == (0, [])
        watches = [asyncio.create_task(board.watch(r, 0)) for r in ("r1", "r2")]
        publish = asyncio.create_task(board.publish("acme", "v000002", timeout_s=5))
        assert [await w for w in watches] == [(1, ["acme"]), (1, ["acme"])]
        await board.report("r1", event("acme", "r1", "v000002"))
        await asyncio.sleep(0.05)
        assert not publish.done()  # r2 has not switched yet
        await board.report("r2", event("acme", "r2", "v000002", dropped_at=None))
        await asyncio.sleep(0.05)
        assert not publish.done()  # r2 serves v2 but still holds v1
        await board.report("r2", event("acme", "r2", "v000002", dropped_at=2.0))
        return await publish

    result = run(scenario())
    assert result["complete"] and result["missing"] == [] and set(result["replicas"]) == {"r1", "r2"}
    assert result["switched_at"].startswith("1970-01-01T00:00:02")  # the last replica's drop time


def test_publish_times_out_naming_the_missing_replica():
    async def scenario():
        board = AdapterBoard()
        await board.watch("r1", -1)
        return await board.publish("acme", "v000002", timeout_s=0.1)

    result = run(scenario())
    assert not result["complete"] and result["missing"] == ["r1"] and result["switched_at"] is None


def test_a_replica_that_leaves_is_not_waited_for():
    async def scenario():
        board = AdapterBoard()
        await board.watch("r1", -1)
        publish = asyncio.create_task(board.publish("acme", "v000002", timeout_s=5))
        await asyncio.sleep(0.01)
        await board.leave("r1")
        return await publish

    assert run(scenario())["complete"]


def test_a_later_version_also_counts_and_stale_reports_do_not():
    async def scenario():
        board = AdapterBoard()
        await board.watch("r1", -1)
        await board.report("r1", event("acme", "r1", "v000002", started_at=1.0))  # before the publish
        publish = asyncio.create_task(board.publish("acme", "v000002", timeout_s=5))
        await asyncio.sleep(0.05)
        assert not publish.done()
        await board.report("r1", event("acme", "r1", "v000003"))
        return await publish

    assert run(scenario())["complete"]


def test_a_replica_far_behind_is_told_to_refresh_everything():
    async def scenario():
        board = AdapterBoard()
        await board.watch("r1", -1)
        for i in range(MAX_CHANGES + 5):
            await board.publish(f"t{i}", None, timeout_s=0)
        return await board.watch("r1", 0, timeout_s=0.01)

    epoch, tenants = run(scenario())
    assert epoch == MAX_CHANGES + 5 and tenants == [ALL]
