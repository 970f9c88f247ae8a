"""Where predictions live between requests: one interface, in SQLite (one gateway, kept across its restarts: the
default), in memory (one gateway, gone with its process) or in Redis (several gateways, e.g. Kubernetes replicas of
the gateway, serving the same predictions).

A prediction is a record (status, input, timestamps, error, metrics) plus its output: the texts of its tokens, in
order, numbered from 0. Only the gateway that runs a prediction writes its output and its end; any gateway reads
it, waits for more of it and asks for its cancellation.

Bounds: a finished prediction is kept `ttl_s` after its end, then it is gone (404); at most `max_kept` predictions
are kept, and making room drops the oldest finished ones first; when every kept prediction is still running, a new
one is refused (StoreFull, a 429).

Redis layout, for a prediction `id` under `prefix`:
  {prefix}{id}          hash: the record's fields (JSON values)
  {prefix}{id}:output   stream: one entry per token text, with the explicit id 0-(index+1), so that reading from
                        output index N is a read after id 0-N; the prediction's end appends the entry 1-0, which
                        wakes every reader blocked on the stream (XREAD BLOCK)
  {prefix}running       sorted set of running ids, by creation time (Redis's clock)
  {prefix}finished      sorted set of finished ids, by end time: eviction takes the oldest first
  {prefix}cancel        pub/sub channel: the id of a prediction whose cancellation was asked for, which the gateway
                        that runs it acts on. Its token writes also fail once it has ended, so a lost message only
                        delays the stop to its next token.
Every key expires `ttl_s` after the prediction's last write: a prediction whose gateway died mid-way goes too.

SQLite layout, in one file that one gateway holds (an exclusive lock on `<file>.lock`, so that two gateways never
share it unawares):
  predictions  one row per prediction: the record's fields (JSON values, as in Redis's hash), `ended_at` (Unix
               time of its end, NULL while it runs; the TTL counts from it) and `seq` (creation order)
  outputs      one row per token text: (id, idx, text)
A prediction found running when the store starts had its run die with the previous process: it ends as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import sqlite3
import sys
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from schemas import ErrorCode

log = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# What a prediction that was running when its gateway stopped (a crash, a restart) reads once the gateway is back.
RESTARTED_ERROR = "the service restarted while the prediction ran: create it again"
# The record field that only full reads fetch: an event stream reads the record per token, and a prompt may be long.
INPUT_FIELD = "input"


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Prediction:
    """A prediction's record, without its output."""

    id: str
    model: str
    version: str
    input: dict[str, Any] | None
    created_at: str
    status: str = "starting"
    started_at: str | None = None
    completed_at: str | None = None
    error: str | None = None
    error_code: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Snapshot:
    """A prediction and its output from `offset` on, read together: once the status is terminal the output is
    complete."""

    prediction: Prediction
    offset: int
    output: list[str]
    count: int  # the prediction's outputs so far, all of them


class StoreFull(Exception):
    """Every kept prediction is still running: the message says how many are kept at most."""


class PredictionStore(ABC):
    """The store's contract. `on_cancel(id)` is called on this gateway when a cancellation of `id` was asked for
    (on any gateway sharing the store); the gateway stops the prediction if it runs it. `errors`: the exceptions
    the store raises when its backend fails (the routes answer them with a 503)."""

    errors: tuple[type[Exception], ...] = ()

    def __init__(self, ttl_s: float, max_kept: int) -> None:
        self.ttl_s = ttl_s
        self.max_kept = max_kept
        self.on_cancel: Callable[[str], None] = lambda _id: None

    @abstractmethod
    async def start(self) -> None:
        """Start background work (on the server's event loop)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and release connections."""

    @abstractmethod
    async def create(self, prediction: Prediction) -> None:
        """Keep a new prediction, dropping expired and (when full) the oldest finished ones. StoreFull when every
        kept prediction is still running."""

    @abstractmethod
    async def delete(self, id: str) -> None:
        """Forget a prediction at once (one that the executor refused before it started)."""

    @abstractmethod
    async def update(self, id: str, **changes: Any) -> None:
        """Change fields of a prediction that has not ended (its status going from starting to processing)."""

    @abstractmethod
    async def append(self, id: str, index: int, text: str) -> bool:
        """Add the output text at `index` (0, 1, ...). False when the prediction has ended (it was cancelled, or
        it expired): the runner stops."""

    @abstractmethod
    async def finish(self, id: str, **changes: Any) -> bool:
        """End a prediction (`changes` holds its terminal status) unless it has ended already; True if this call
        ended it."""

    @abstractmethod
    async def get(self, id: str, offset: int = 0, with_input: bool = True) -> Snapshot | None:
        """The prediction and its output from `offset` on; None when there is no such prediction (or no longer)."""

    @abstractmethod
    async def wait(self, id: str, offset: int, timeout_s: float) -> None:
        """Return once the prediction has output beyond `offset` or has ended, or after `timeout_s`."""

    async def cancel(self, id: str) -> bool:
        """End a running prediction as canceled and tell the gateway that runs it; True if this call ended it."""
        ended = await self.finish(id, status="canceled", completed_at=now_iso())
        if ended:
            await self._announce_cancel(id)
        return ended

    @abstractmethod
    async def _announce_cancel(self, id: str) -> None: ...


# In memory -------------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    prediction: Prediction
    output: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float | None = None  # time.monotonic() of the end

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class MemoryStore(PredictionStore):
    """One gateway's predictions, in its process."""

    def __init__(self, ttl_s: float, max_kept: int) -> None:
        super().__init__(ttl_s, max_kept)
        self._running: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, _Entry] = OrderedDict()  # oldest end first
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_every(min(self.ttl_s, 30.0)))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    async def _sweep_every(self, period_s: float) -> None:
        # So that an idle gateway hands back the memory of expired predictions too, not only the next create.
        while True:
            await asyncio.sleep(period_s)
            self._sweep()

    def _sweep(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        while self._finished:
            id, entry = next(iter(self._finished.items()))
            if entry.ended_at is None or entry.ended_at > deadline:
                break
            del self._finished[id]

    def _entry(self, id: str) -> _Entry | None:
        self._sweep()
        return self._running.get(id) or self._finished.get(id)

    async def create(self, prediction: Prediction) -> None:
        self._sweep()
        while len(self._running) + len(self._finished) >= self.max_kept:
            if not self._finished:
                raise StoreFull(f"{len(self._running)} predictions are running, the most this service keeps")
            self._finished.popitem(last=False)
        self._running[prediction.id] = _Entry(prediction)

    async def delete(self, id: str) -> None:
        self._running.pop(id, None)
        self._finished.pop(id, None)

    async def update(self, id: str, **changes: Any) -> None:
        if (entry := self._running.get(id)) is not None:
            for name, value in changes.items():
                setattr(entry.prediction, name, value)
            entry.notify()

    async def append(self, id: str, index: int, text: str) -> bool:
        entry = self._running.get(id)
        if entry is None:
            return False
        assert index == len(entry.output), f"output {index} appended after {len(entry.output)}"
        # Token texts repeat across predictions: one shared copy of each makes a kept output about five times
        # smaller (measured with `python -m bench.predictions_soak --in-process`, 2000 predictions of 256 tokens:
        # 19.6 KiB a prediction without, 3.7 with).
        entry.output.append(sys.intern(text))
        entry.notify()
        return True

    async def finish(self, id: str, **changes: Any) -> bool:
        entry = self._running.pop(id, None)
        if entry is None:
            return False
        for name, value in changes.items():
            setattr(entry.prediction, name, value)
        entry.ended_at = time.monotonic()
        self._finished[id] = entry
        entry.notify()
        return True

    async def get(self, id: str, offset: int = 0, with_input: bool = True) -> Snapshot | None:
        entry = self._entry(id)
        if entry is None:
            return None
        # A copy: the caller formats it after awaiting other things, while the runner goes on changing the entry.
        prediction = Prediction(**{f.name: getattr(entry.prediction, f.name) for f in fields(Prediction)})
        return Snapshot(prediction, offset, entry.output[offset:], len(entry.output))

    async def wait(self, id: str, offset: int, timeout_s: float) -> None:
        entry = self._entry(id)
        if entry is None or len(entry.output) > offset or entry.prediction.ended:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(entry.output) <= offset and not entry.prediction.ended:
                    await entry.changed.wait()

    async def _announce_cancel(self, id: str) -> None:
        self.on_cancel(id)

    @property
    def kept(self) -> int:
        return len(self._running) + len(self._finished)


# Redis -----------------------------------------------------------------------------------------------------------

# KEYS[1] running, KEYS[2] finished; ARGV: prefix, id, ttl_ms, max_kept, then the record's fields as name, value.
_CREATE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local prefix, id, ttl_ms, max_kept = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - ttl_ms)
while redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= max_kept do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest > 0 then
    redis.call('DEL', prefix .. oldest[1], prefix .. oldest[1] .. ':output')
  else
    -- Only running ones: drop one whose gateway died and whose keys expired, else refuse.
    local first = redis.call('ZRANGE', KEYS[1], 0, 0)
    if #first == 0 or redis.call('EXISTS', prefix .. first[1]) == 1 then
      return redis.call('ZCARD', KEYS[1])
    end
    redis.call('ZREM', KEYS[1], first[1])
  end
end
local record = {}
for i = 5, #ARGV do record[#record + 1] = ARGV[i] end
redis.call('HSET', prefix .. id, unpack(record))
redis.call('PEXPIRE', prefix .. id, ttl_ms)
redis.call('ZADD', KEYS[1], now_ms, id)
return -1
"""

# KEYS[1] record, KEYS[2] output; ARGV: stream id, text, ttl_ms.
_APPEND = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == '"succeeded"' or status == '"failed"' or status == '"canceled"' then return 0 end
redis.call('XADD', KEYS[2], ARGV[1], 't', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# KEYS[1] record, KEYS[2] output, KEYS[3] running, KEYS[4] finished; ARGV: id, ttl_ms, then fields as name, value.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == '"succeeded"' or status == '"failed"' or status == '"canceled"' then return 0 end
local changes = {}
for i = 3, #ARGV do changes[#changes + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(changes))
redis.call('XADD', KEYS[2], '1-0', 'end', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local now = redis.call('TIME')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), ARGV[1])
return 1
"""

# KEYS[1] record; ARGV: fields as name, value. Only while the prediction runs (a late update must not revive it).
_UPDATE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == '"succeeded"' or status == '"failed"' or status == '"canceled"' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

END_ENTRY = "1-0"
# How long one blocked read waits before the waiter looks again (a reader that went away stops within this).
MAX_BLOCK_S = 5.0


def _stream_id(index: int) -> str:
    return f"0-{index + 1}"


def _encode(changes: dict[str, Any]) -> dict[str, str]:
    """A record's fields as stored, in Redis and in SQLite alike: each value as JSON."""
    return {name: json.dumps(value) for name, value in changes.items()}


def _decode(id: str, stored: dict[str, str | None]) -> Prediction:
    """The Prediction of stored fields (a field not read, e.g. the input, is None)."""
    record = {name: json.loads(value) for name, value in stored.items() if value is not None}
    return Prediction(id=id, **{INPUT_FIELD: None, **record})


def _flatten(changes: dict[str, Any]) -> list[str]:
    return [item for name, value in _encode(changes).items() for item in (name, value)]


def _record(prediction: Prediction) -> dict[str, Any]:
    """A prediction's fields but its id (the key it is stored under)."""
    return {name: value for name, value in asdict(prediction).items() if name != "id"}


def _record_fields(with_input: bool = True) -> list[str]:
    return [f.name for f in fields(Prediction) if f.name != "id" and (with_input or f.name != INPUT_FIELD)]


class RedisStore(PredictionStore):
    """Predictions in Redis, shared by every gateway given the same URL and prefix."""

    def __init__(self, url: str, ttl_s: float, max_kept: int, prefix: str = "llm:prediction:") -> None:
        super().__init__(ttl_s, max_kept)
        # Only a gateway configured with Redis needs the package.
        from redis.asyncio import from_url
        from redis.exceptions import RedisError

        self.errors = (RedisError, OSError)
        self._redis = from_url(url, decode_responses=True)
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._running_key, self._finished_key = prefix + "running", prefix + "finished"
        self._channel = prefix + "cancel"
        self._create = self._redis.register_script(_CREATE)
        self._append = self._redis.register_script(_APPEND)
        self._finish = self._redis.register_script(_FINISH)
        self._update = self._redis.register_script(_UPDATE)
        self._listener: asyncio.Task | None = None

    def _keys(self, id: str) -> tuple[str, str]:
        return self._prefix + id, self._prefix + id + ":output"

    async def start(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self._channel)  # before serving: a cancellation is never missed for want of it
        self._listener = asyncio.create_task(self._listen(pubsub))

    async def _listen(self, pubsub: Any) -> None:
        import redis.exceptions

        try:
            while True:
                try:
                    message = await pubsub.get_message(timeout=MAX_BLOCK_S)
                except redis.exceptions.ConnectionError as error:
                    # The append script's refusal still stops a cancelled prediction at its next token.
                    log.warning(f"prediction cancellations: Redis unreachable ({error}); retrying")
                    await asyncio.sleep(1.0)
                    continue
                if message is not None:
                    self.on_cancel(message["data"])
        finally:
            await pubsub.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self._redis.aclose()

    async def create(self, prediction: Prediction) -> None:
        record = _record(prediction)
        running = await self._create(
            keys=[self._running_key, self._finished_key],
            args=[self._prefix, prediction.id, self._ttl_ms, self.max_kept, *_flatten(record)],
        )
        if running >= 0:
            raise StoreFull(f"{running} predictions are running, the most this service keeps")

    async def delete(self, id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            # A pipeline buffers its commands: none is awaited before execute().
            pipe.delete(*self._keys(id))
            pipe.zrem(self._running_key, id)
            pipe.zrem(self._finished_key, id)
            await pipe.execute()

    async def update(self, id: str, **changes: Any) -> None:
        await self._update(keys=[self._keys(id)[0]], args=_flatten(changes))

    async def append(self, id: str, index: int, text: str) -> bool:
        return bool(await self._append(keys=list(self._keys(id)), args=[_stream_id(index), text, self._ttl_ms]))

    async def finish(self, id: str, **changes: Any) -> bool:
        keys = [*self._keys(id), self._running_key, self._finished_key]
        return bool(await self._finish(keys=keys, args=[id, self._ttl_ms, *_flatten(changes)]))

    async def get(self, id: str, offset: int = 0, with_input: bool = True) -> Snapshot | None:
        record_key, output_key = self._keys(id)
        names = _record_fields(with_input)
        async with self._redis.pipeline(transaction=True) as pipe:  # MULTI: the record and output of one moment
            pipe.hmget(record_key, names)
            pipe.xlen(output_key)
            pipe.xrange(output_key, f"({_stream_id(offset - 1)}", "+")
            values, length, entries = await pipe.execute()
        if values[0] is None:  # `model` is always set: the record is gone
            return None
        output = [entry["t"] for entry_id, entry in entries if entry_id != END_ENTRY]
        prediction = _decode(id, dict(zip(names, values)))
        return Snapshot(prediction, offset, output, length - 1 if prediction.ended else length)

    async def wait(self, id: str, offset: int, timeout_s: float) -> None:
        # XREAD BLOCK returns at once when the stream holds an entry after the offset's (a token or the end).
        # A blocked read holds a connection of the pool: at most MAX_BLOCK_S at a time.
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            block_ms = max(1, int(min(remaining, MAX_BLOCK_S) * 1000))
            if await self._redis.xread({self._keys(id)[1]: _stream_id(offset - 1)}, count=1, block=block_ms):
                return

    async def _announce_cancel(self, id: str) -> None:
        await self._redis.publish(self._channel, id)


# SQLite ----------------------------------------------------------------------------------------------------------

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, ended_at REAL, {columns}
);
CREATE INDEX IF NOT EXISTS predictions_ended ON predictions (ended_at);
CREATE TABLE IF NOT EXISTS outputs (
  id TEXT NOT NULL, idx INTEGER NOT NULL, text TEXT NOT NULL, PRIMARY KEY (id, idx)
) WITHOUT ROWID;
"""
# How long a start waits for the file's lock: a gateway that the supervisor restarts may start while the previous
# one is still exiting (the kernel releases its lock when it has).
LOCK_WAIT_S = 30.0


class SQLiteStore(PredictionStore):
    """One gateway's predictions in a SQLite file, kept across the gateway's restarts.

    Every SQLite call runs on one worker thread of the store's, with its own connection: the event loop never
    waits on the file. Only this gateway writes the file, so readers waiting for more output are woken in
    process, as in memory. WAL with synchronous=NORMAL: a commit survives the process's crash (a power loss may
    take the last ones)."""

    errors = (sqlite3.Error, OSError)

    def __init__(self, path: Path, ttl_s: float, max_kept: int) -> None:
        super().__init__(ttl_s, max_kept)
        self.path = path
        self._fields = _record_fields()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prediction-store")
        self._db: sqlite3.Connection | None = None
        self._lock_file: Any = None
        # Readers waiting on a prediction's next change; an event lives as long as a reader holds it.
        self._changed: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()
        self._sweeper: asyncio.Task | None = None

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def _notify(self, id: str) -> None:
        if (event := self._changed.pop(id, None)) is not None:
            event.set()

    # On the worker thread --------------------------------------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "the store is not started"
        return self._db

    def _open(self) -> int:
        """Lock the file, open it and end the predictions a previous process left running; how many it ended."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "w")  # noqa: SIM115 (held open)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the prediction store {self.path} is in use by another gateway: give each "
                                       "gateway a sqlite_path of its own, or redis_url to share predictions") from None
                time.sleep(0.1)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA.format(columns=", ".join(f"{name} TEXT" for name in self._fields)))
        changes = _encode({"status": "failed", "completed_at": now_iso(), "error": RESTARTED_ERROR,
                           "error_code": ErrorCode.UNAVAILABLE.value})
        with self._transaction() as db:
            ended = db.execute(
                f"UPDATE predictions SET ended_at = ?, {', '.join(f'{name} = ?' for name in changes)} "
                "WHERE ended_at IS NULL", [time.time(), *changes.values()],
            ).rowcount
        return ended

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _shut(self) -> None:
        if self._db is not None:
            self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock

    def _sweep(self, db: sqlite3.Connection) -> None:
        expired = "SELECT id FROM predictions WHERE ended_at <= ?"
        deadline = time.time() - self.ttl_s
        db.execute(f"DELETE FROM outputs WHERE id IN ({expired})", [deadline])
        db.execute("DELETE FROM predictions WHERE ended_at <= ?", [deadline])

    def _swept(self) -> None:
        with self._transaction() as db:
            self._sweep(db)

    def _create(self, prediction: Prediction) -> None:
        with self._transaction() as db:
            self._sweep(db)
            (kept,) = db.execute("SELECT count(*) FROM predictions").fetchone()
            if kept >= self.max_kept:
                oldest = "SELECT id FROM predictions WHERE ended_at IS NOT NULL ORDER BY ended_at LIMIT ?"
                db.execute(f"DELETE FROM outputs WHERE id IN ({oldest})", [kept - self.max_kept + 1])
                dropped = db.execute(f"DELETE FROM predictions WHERE id IN ({oldest})",
                                     [kept - self.max_kept + 1]).rowcount
                if kept - dropped >= self.max_kept:
                    raise StoreFull(f"{kept - dropped} predictions are running, the most this service keeps")
            record = _encode(_record(prediction))
            db.execute(f"INSERT INTO predictions (id, {', '.join(record)}) VALUES (?{', ?' * len(record)})",
                       [prediction.id, *record.values()])

    def _delete(self, id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM outputs WHERE id = ?", [id])
            db.execute("DELETE FROM predictions WHERE id = ?", [id])

    def _change(self, id: str, changes: dict[str, Any], ended_at: float | None) -> bool:
        """Set fields of a running prediction (and its end, with `ended_at`); False when it has ended or is gone."""
        stored = _encode(changes)
        assignments = ", ".join(["ended_at = ?", *(f"{name} = ?" for name in stored)])
        return self._conn.execute(f"UPDATE predictions SET {assignments} WHERE id = ? AND ended_at IS NULL",
                                  [ended_at, *stored.values(), id]).rowcount == 1

    def _append(self, id: str, index: int, text: str) -> bool:
        return self._conn.execute(
            "INSERT INTO outputs (id, idx, text) SELECT ?, ?, ? "
            "WHERE EXISTS (SELECT 1 FROM predictions WHERE id = ? AND ended_at IS NULL)", [id, index, text, id],
        ).rowcount == 1

    def _read(self, id: str, offset: int, names: list[str]) -> Snapshot | None:
        # Only this thread writes the file: its reads one after the other see one moment.
        db = self._conn
        row = db.execute(f"SELECT {', '.join(names)} FROM predictions WHERE id = ? "
                         "AND (ended_at IS NULL OR ended_at > ?)", [id, time.time() - self.ttl_s]).fetchone()
        if row is None:
            return None
        output = [text for (text,) in db.execute(
            "SELECT text FROM outputs WHERE id = ? AND idx >= ? ORDER BY idx", [id, offset])]
        (count,) = db.execute("SELECT count(*) FROM outputs WHERE id = ?", [id]).fetchone()
        return Snapshot(_decode(id, dict(zip(names, row))), offset, output, count)

    # The interface, on the event loop --------------------------------------------------------------------------

    async def start(self) -> None:
        if ended := await self._call(self._open):
            log.warning(f"predictions: {ended} running when the service stopped ended as failed ({self.path})")
        self._sweeper = asyncio.create_task(self._sweep_every(min(self.ttl_s, 30.0)))

    async def _sweep_every(self, period_s: float) -> None:
        # So that an idle gateway drops expired predictions too, not only the next create.
        while True:
            await asyncio.sleep(period_s)
            try:
                await self._call(self._swept)
            except self.errors as error:
                log.error(f"predictions: sweeping {self.path} failed: {error!r}")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self._call(self._shut)
        self._worker.shutdown()

    async def create(self, prediction: Prediction) -> None:
        await self._call(self._create, prediction)

    async def delete(self, id: str) -> None:
        await self._call(self._delete, id)

    async def update(self, id: str, **changes: Any) -> None:
        if await self._call(self._change, id, changes, None):
            self._notify(id)

    async def append(self, id: str, index: int, text: str) -> bool:
        appended = await self._call(self._append, id, index, text)
        if appended:
            self._notify(id)
        return appended

    async def finish(self, id: str, **changes: Any) -> bool:
        ended = await self._call(self._change, id, changes, time.time())
        if ended:
            self._notify(id)
        return ended

    async def get(self, id: str, offset: int = 0, with_input: bool = True) -> Snapshot | None:
        return await self._call(self._read, id, offset, _record_fields(with_input))

    async def wait(self, id: str, offset: int, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    # Taken before the read: a change between the read and the wait still wakes this reader.
                    changed = self._changed.get(id)
                    if changed is None:
                        changed = self._changed[id] = asyncio.Event()
                    snapshot = await self.get(id, offset, with_input=False)
                    if snapshot is None or snapshot.output or snapshot.prediction.ended:
                        return
                    await changed.wait()

    async def _announce_cancel(self, id: str) -> None:
        self.on_cancel(id)
