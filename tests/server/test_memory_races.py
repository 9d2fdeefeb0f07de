"""Conversation memory's races on the web side (`server.memory.memories`), on a real `MemoryStore` folder and an
engine stand-in whose saves the test releases: concurrent resumes of one token, a wrong key's cost, a save racing
a DELETE, a stale instance's save after a resume elsewhere (two `Memories` on one store, as two instances on one
shared folder), the token confirmation, the bound on concurrent body loads."""

from __future__ import annotations

import asyncio

import pytest
from moshi_ttt.server.memory.memories import ConversationMemory, Memories, MemoryConfig
from moshi_ttt.server.metrics import Metrics

from moshi_ttt.memory.seal import HEADER_CAP, MemoryUnavailable, Token
from moshi_ttt.memory.store import MemoryStore

FP = "fingerprint-of-the-model"
OWNER = "192.0.2.7"


class Engine:
    """The engine's memory requests: a save answers `data` (frames `frames`) once `gate` is set; a restore
    answers at once."""

    def __init__(self, data: bytes = b"memory file " * 100, frames: int = 16):
        self.data, self.frames = data, frames
        self.gate = asyncio.Event()
        self.gate.set()
        self.saves = 0

    def save_memory(self, slot, conv_id, done, final=False) -> None:
        async def answer() -> None:
            await self.gate.wait()
            self.saves += 1
            done(True, {"data": self.data, "frames": self.frames, "chunks": 2, "compression": "exact"})
        asyncio.get_running_loop().create_task(answer())

    def restore_memory(self, slot, conv_id, data, done) -> None:
        done(True, {"frames": self.frames, "telemetry": {}})


def memories(store_dir) -> Memories:
    return Memories(MemoryStore(store_dir), FP, Metrics(), MemoryConfig(save_every=0, timeout=10))


def failures(m: Memories) -> dict[str, int]:
    return {s.labels["cause"]: int(s.value) for fam in m.metrics.registry.collect() for s in fam.samples
            if s.name == "moshi_ttt_memory_failures_total"}


async def stored(m: Memories, engine: Engine) -> ConversationMemory:
    """A new remembered conversation, saved once."""
    conv = ConversationMemory(m, engine, Token.new(), OWNER)
    conv.attach(slot=object(), conv_id=1)
    assert await conv.save("checkpoint")
    conv.forget()
    return conv


def test_concurrent_resumes_of_one_token_exactly_one_wins(tmp_path):
    async def go():
        m = memories(tmp_path)
        conv = await stored(m, Engine())
        return await asyncio.gather(*(m.open(str(conv.token)) for _ in range(4)), return_exceptions=True), conv

    out, conv = asyncio.run(go())
    won = [o for o in out if not isinstance(o, BaseException)]
    lost = [o for o in out if isinstance(o, BaseException)]
    assert len(won) == 1 and won[0].token.id == conv.token.id, out
    assert len(lost) == 3 and all(isinstance(e, MemoryUnavailable) and e.label == "in_use" for e in lost), lost


def test_in_use_is_said_only_to_a_holder_of_the_key(tmp_path):
    async def go():
        m = memories(tmp_path)
        conv = await stored(m, Engine())
        await m.open(str(conv.token))  # now in use here
        with pytest.raises(MemoryUnavailable) as e:
            await m.open(str(Token(conv.token.id, Token.new().key)))
        return e.value

    e = asyncio.run(go())
    assert e.label != "in_use", e.cause  # the wrong key is refused for its key, not for the use


def test_a_wrong_key_costs_a_header_read_at_most(tmp_path):
    """A resume with a wrong key for a large memory: refused after reading its header alone."""
    async def go():
        m = memories(tmp_path)
        conv = ConversationMemory(m, Engine(data=bytes(8 << 20)), Token.new(), OWNER)
        conv.attach(slot=object(), conv_id=1)
        assert await conv.save("checkpoint")
        conv.forget()
        before = m.store.bytes_read
        with pytest.raises(MemoryUnavailable) as e:
            await m.open(str(Token(conv.token.id, Token.new().key)))
        return e.value, m.store.bytes_read - before

    e, read = asyncio.run(go())
    assert e.label == "wrong_key" and read <= HEADER_CAP, (e.cause, read)


def test_a_save_racing_a_delete_leaves_it_deleted(tmp_path):
    """The DELETE answers 204 while a save of the memory is in flight: the save fails safely (stale), the memory
    stays deleted, and no later save is tried."""
    async def go():
        m, engine = memories(tmp_path), Engine()
        conv = ConversationMemory(m, engine, Token.new(), OWNER)
        conv.attach(slot=object(), conv_id=1)
        assert await conv.save("checkpoint")
        engine.gate.clear()
        saving = asyncio.create_task(conv.save("checkpoint"))
        await asyncio.sleep(0.05)  # the save waits for the engine's bytes
        m.deleted.clear()  # what this instance knows does not matter: another instance may have taken the DELETE
        deleted = await memories(tmp_path).delete(str(conv.token), conv.token.id, "203.0.113.1")
        engine.gate.set()
        ok = await saving
        later = await conv.save("end", final=True)
        return conv, deleted, ok, later, engine.saves, failures(m)

    conv, deleted, ok, later, saves, causes = asyncio.run(go())
    assert deleted and ok is False and later is False and saves == 2, (deleted, ok, later, saves)
    assert causes.get("stale") == 1, causes
    with pytest.raises(MemoryUnavailable):
        MemoryStore(tmp_path).open(conv.token, FP)


def test_a_stale_instance_cannot_overwrite_a_resume_elsewhere(tmp_path):
    """Instance A's client dropped and resumed on instance B, which re-sealed the memory under the confirmed new
    token; A's save at its idle timeout comes after: it fails safely and the new token still opens the memory."""
    async def go():
        a, b = memories(tmp_path), memories(tmp_path)
        on_a = ConversationMemory(a, Engine(frames=16), Token.new(), OWNER)
        on_a.attach(slot=object(), conv_id=1)
        assert await on_a.save("checkpoint")
        opened = await b.open(str(on_a.token))
        on_b = ConversationMemory(b, Engine(frames=40), opened.token, OWNER, opened)
        on_b.attach(slot=object(), conv_id=1)
        await on_b.restore(await b.read(opened))
        answer = await on_b.confirm(on_b.message(0)["memory"]["token"])
        stale = await on_a.save("end", final=True)
        return on_a, on_b, answer, stale, failures(a)

    on_a, on_b, answer, stale, causes = asyncio.run(go())
    assert answer["memory"]["confirmed"] is True and stale is False and causes.get("stale") == 1, (answer, causes)
    store = MemoryStore(tmp_path)
    assert store.read(store.open(on_b.token, FP)) == Engine().data  # B's save, under the new token
    with pytest.raises(MemoryUnavailable):
        store.open(on_a.token, FP)  # the old token opens nothing after the confirmation


def test_until_confirmed_saves_keep_the_old_token(tmp_path):
    """A resumed conversation is sent a new token, but until its client confirms it every save is sealed with
    the old one: a drop before the confirmation leaves a token that opens the memory."""
    async def go():
        m = memories(tmp_path)
        first = await stored(m, Engine())
        opened = await m.open(str(first.token))
        conv = ConversationMemory(m, Engine(frames=30), opened.token, OWNER, opened)
        conv.attach(slot=object(), conv_id=1)
        await conv.restore(await m.read(opened))
        new = conv.message(0)["memory"]["token"]
        assert await conv.save("checkpoint") and await conv.save("end", final=True)
        return first.token, Token.parse(new)

    old, new = asyncio.run(go())
    store = MemoryStore(tmp_path)
    assert store.open(old, FP).token.id == old.id
    with pytest.raises(MemoryUnavailable):
        store.open(new, FP)


def test_bad_confirmations_are_answered_and_change_nothing(tmp_path):
    async def go():
        m = memories(tmp_path)
        fresh = ConversationMemory(m, Engine(), Token.new(), OWNER)
        fresh.attach(slot=object(), conv_id=1)
        unexpected = await fresh.confirm(str(fresh.token))
        first = await stored(m, Engine())
        opened = await m.open(str(first.token))
        conv = ConversationMemory(m, Engine(), opened.token, OWNER, opened)
        conv.attach(slot=object(), conv_id=2)
        await conv.restore(await m.read(opened))
        new = conv.message(0)["memory"]["token"]
        wrong = await conv.confirm(str(Token.new(first.token.id)))
        still_old = conv.token == first.token
        ok = await conv.confirm(new)
        duplicate = await conv.confirm(new)
        return unexpected, wrong, still_old, ok, duplicate

    unexpected, wrong, still_old, ok, duplicate = asyncio.run(go())
    assert unexpected["memory"]["error"].startswith("nothing to confirm"), unexpected
    assert wrong["memory"]["error"] == "not the token this conversation was sent" and still_old, wrong
    assert ok["memory"]["confirmed"] is True, ok
    assert duplicate["memory"]["error"] == "this token was already confirmed", duplicate


def test_body_loads_are_bounded(tmp_path):
    """`max_loads` (2) bodies are read at once: reads meet in pairs (a barrier of 2), never three at a time."""
    import threading

    class Store(MemoryStore):
        reading = peak = 0
        pair = threading.Barrier(2, timeout=10)

        def read(self, opened):
            Store.reading += 1
            Store.peak = max(Store.peak, Store.reading)
            try:
                Store.pair.wait()  # needs a second read in flight: fails with max_loads 1
                return super().read(opened)
            finally:
                Store.reading -= 1

    async def go():
        m = Memories(Store(tmp_path), FP, Metrics(), MemoryConfig(save_every=0, timeout=10, max_loads=2))
        opened = []
        for _ in range(4):
            conv = await stored(m, Engine())
            opened.append(await m.open(str(conv.token)))
        return await asyncio.gather(*(m.read(o) for o in opened))

    out = asyncio.run(go())
    assert out == [Engine().data] * 4 and Store.peak == 2, Store.peak
