"""The web process collects the store's expired memories periodically (`Memories.collect`, `--memory-gc-every`),
off every save's path: counted, and a failing store is logged and counted, never raised."""

from __future__ import annotations

import asyncio

from aiohttp import web
from moshi_ttt.server.memory.memories import Memories, MemoryConfig
from moshi_ttt.server.metrics import Metrics
from moshi_ttt.server.web.app import AppConfig, create_app

from moshi_ttt.memory.seal import Token
from moshi_ttt.memory.store import GRACE, MemoryStore, StoreError

FP = "fingerprint-of-the-model"
TTL = 100.0


def _sample(m: Memories, name: str, **labels) -> float:
    return sum(s.value for fam in m.metrics.registry.collect() for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _store_with_one_expired(tmp_path, now: list[float]) -> tuple[MemoryStore, Token, Token]:
    store = MemoryStore(tmp_path, ttl=TTL, clock=lambda: now[0])
    old, fresh = Token.new(), Token.new()
    store.save(old, FP, b"old memory", {"frames": 1}, owner="a", expect=None)
    now[0] += TTL + GRACE + 1
    store.save(fresh, FP, b"fresh memory", {"frames": 1}, owner="a", expect=None)
    return store, old, fresh


def test_a_collection_removes_the_expired_and_counts_them(tmp_path):
    now = [1_000_000.0]
    store, old, fresh = _store_with_one_expired(tmp_path, now)
    m = Memories(store, FP, Metrics(), MemoryConfig(save_every=0))
    assert asyncio.run(m.collect()) == 1
    assert _sample(m, "moshi_ttt_memory_collected_total") == 1
    assert store.load(fresh, FP) == b"fresh memory"
    assert [e["id"] for e in store.entries()] == [fresh.id]


def test_a_failing_store_is_counted_not_raised(tmp_path):
    class Broken(MemoryStore):
        def gc(self):
            raise StoreError("gc: the bucket answered 503")

    m = Memories(Broken(tmp_path), FP, Metrics(), MemoryConfig(save_every=0))
    assert asyncio.run(m.collect()) == 0
    assert _sample(m, "moshi_ttt_memory_failures_total", cause="store") == 1


def test_the_app_collects_while_it_runs(tmp_path):
    now = [1_000_000.0]
    store, old, fresh = _store_with_one_expired(tmp_path, now)
    m = Memories(store, FP, Metrics(), MemoryConfig(save_every=0, gc_every=3600))

    async def go():
        runner = web.AppRunner(create_app(engine=object(), metrics=m.metrics, cfg=AppConfig(static_dir=None,
                                                                                             memories=m)))
        await runner.setup()  # the app's start-up: the first collection runs at once
        try:
            for _ in range(200):
                if _sample(m, "moshi_ttt_memory_collected_total"):
                    break
                await asyncio.sleep(0.01)
        finally:
            await runner.cleanup()

    asyncio.run(go())
    assert _sample(m, "moshi_ttt_memory_collected_total") == 1
    assert [e["id"] for e in store.entries()] == [fresh.id]
