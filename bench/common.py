"""What the benchmarks share: machine facts, percentiles, services, daemon subprocesses, polling.

Every process a benchmark starts is started here and stopped by the same object (its own
process group, SIGTERM then SIGKILL), and every service is started through
:func:`twotower.infra.up` into a temporary state directory on free loopback ports unless
``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` name running ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import platform
import queue
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from twotower import infra
from twotower.config import load_config
from twotower.events import CatalogItem, Interaction, Record
from twotower.kafka_io import Topics, ensure_topics, make_producer, send_record
from twotower.processes import DaemonProcess

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


# --- facts and figures --------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU count and model, memory, load average and Python version of this machine."""
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": mem_gib,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


CHECKOUT = Path(__file__).resolve().parent.parent
"""The directory the ``bench`` package was imported from: the code a report measured."""


def provenance(checkout: Path = CHECKOUT) -> dict[str, Any]:
    """What code a run measured, and when it started (call it as the run starts): every bench
    report carries it under ``provenance``.

    Returns:
        ``git_commit``: ``git rev-parse HEAD`` of ``checkout`` (``None`` when it is not a git
        checkout, or git cannot say); ``git_dirty``: whether ``git status --porcelain`` lists
        anything there, changed or untracked files (the code run is then not that commit's;
        ``None`` without a commit); ``started_utc``: now, ISO 8601 in UTC.
    """
    started = datetime.now(UTC).isoformat(timespec="seconds")

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "started_utc": started,
    }


def cpu_jiffies() -> tuple[int, int]:
    """(stolen, all) clock ticks of every CPU since boot, from ``/proc/stat`` (zeros elsewhere).
    *Stolen* is time this virtual machine's CPUs wanted to run but the host ran something else:
    no process here can see or avoid it, and it lands in the latency tail."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        return fields[7], sum(fields[:8])
    return 0, 0


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Percent of the machine's CPU time stolen by the host between two :func:`cpu_jiffies`
    readings (``None`` when no tick passed)."""
    ticks = after[1] - before[1]
    return round(100 * (after[0] - before[0]) / ticks, 2) if ticks > 0 else None


FAILED = ("connect", "read", "write", "timeout")
"""The error counts of a load generator's result that are requests without an answer (a status
other than 200 is an answer: its latency is among the others, the error counted as ``status``)."""


def wrk_latencies(latencies_us: Sequence[float], failed: int = 0) -> dict[str, float]:
    """wrk's latency figures (``p50_us`` … ``max_us``, ``mean_us``) of a load generator's samples,
    each percentile by :func:`percentile` (linear interpolation, the bench's one rule); zeros for
    no requests at all.

    The ``failed`` requests (:data:`FAILED`: no answer, or none within the generator's timeout)
    count as infinitely slow: a percentile (or the max) that reaches them is ``inf``, never a
    flattering figure of the answered ones alone. The mean is of the answered ones (``inf`` when
    none was).
    """
    answered = sorted(latencies_us)
    ordered = answered + [math.inf] * failed

    def at(q: float) -> float:
        return percentile(ordered, q) if ordered else 0.0

    return {
        "p50_us": at(50),
        "p90_us": at(90),
        "p99_us": at(99),
        "p999_us": at(99.9),
        "max_us": ordered[-1] if ordered else 0.0,
        "mean_us": sum(answered) / len(answered) if answered else math.inf if failed else 0.0,
    }


def send_window_s(result: Mapping[str, Any]) -> float:
    """Seconds a load generator's result was sending over: an open loop's send window (its
    ``duration_us`` runs on to its last answer), a closed loop's whole duration."""
    return result.get("send_window_us", result["duration_us"]) / 1e6


def achieved_qps(result: Mapping[str, Any]) -> float:
    """Requests per second over the sending (:func:`send_window_s`), to 0.1."""
    window_s = send_window_s(result)
    return round(result["requests"] / window_s, 1) if window_s > 0 else 0.0


def rounded(value: float, digits: int = 3) -> float | None:
    """``value`` rounded, ``None`` when it is not finite (a percentile that reached a failed request)."""
    return round(value, digits) if math.isfinite(value) else None


def latencies_ms(result: Mapping[str, Any]) -> dict[str, float | None]:
    """``p50_ms`` … ``max_ms`` and ``mean_ms`` of a load generator's result in microseconds
    (:func:`wrk_latencies`' keys), rounded to the microsecond; ``None`` where a figure reached a
    failed request."""
    return {f"{q}_ms": rounded(result[f"{q}_us"] / 1000) for q in ("p50", "p90", "p99", "p999", "max", "mean")}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; ``nan`` for no values.

    ``inf`` values (timeouts) sort last, so a percentile that reaches them is ``inf``.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi or math.isinf(ordered[hi]):
        return ordered[hi] if math.isinf(ordered[hi]) else ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_s(values_s: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """p50/p95/max/mean of durations in seconds (``None`` where a timeout, ``inf``, is reached)."""
    finite = [v for v in values_s if math.isfinite(v)]

    def clean(x: float) -> float | None:
        return round(x, digits) if math.isfinite(x) else None

    return {
        "n": len(values_s),
        "timeouts": len(values_s) - len(finite),
        "p50_s": clean(percentile(values_s, 50)),
        "p95_s": clean(percentile(values_s, 95)),
        "max_s": clean(max(values_s)) if values_s else None,
        "mean_s": clean(sum(finite) / len(finite)) if finite else None,
    }


def write_report(report: Mapping[str, Any], out: Path | None) -> str:
    """The report as indented JSON, also written to ``out`` (parents created) when given."""
    text = json.dumps(report, indent=2, sort_keys=False, allow_nan=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text


def session_cpu_s(session_id: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a session.

    A daemon started by :class:`DaemonProcess` leads its own session, so this covers it and
    every worker it forked.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        # after the command name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        if int(fields[3]) == session_id:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used (``INFO cpu``: user + system, main and children)."""
    info = client.info("cpu")
    return float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))


def redis_slowlog_tip(client: redis.Redis) -> int:
    """Id of the newest entry of Redis's slow log (-1 when it is empty)."""
    entries = client.slowlog_get(1)
    return int(entries[0]["id"]) if entries else -1


def redis_slow_commands(client: redis.Redis, since_id: int) -> dict[str, dict[str, float]]:
    """The commands Redis logged as slow (longer than its ``slowlog-log-slower-than``, 10 ms by
    default) after entry ``since_id``, by command: how many, and the longest in ms. While one
    runs, Redis serves no other client (the retrievers' request path among them)."""
    out: dict[str, dict[str, float]] = {}
    for entry in client.slowlog_get(SLOWLOG_READ):
        if int(entry["id"]) <= since_id:
            continue
        command = entry["command"]
        name = (command.decode(errors="replace") if isinstance(command, bytes) else str(command)).split(" ", 1)[0]
        ms = entry["duration"] / 1000.0
        seen = out.setdefault(name.upper(), {"count": 0, "max_ms": 0.0})
        seen["count"] += 1
        seen["max_ms"] = round(max(seen["max_ms"], ms), 1)
    return out


SLOWLOG_READ = 1024
"""Slow-log entries read back (a Redis the bench starts keeps this many: ``slowlog-max-len``)."""


# --- ports, services, waiting -------------------------------------------------------------------
free_ports = infra.free_ports
"""Distinct loopback ports nobody listens on (the launcher's own helper, re-exported for the benches)."""


@contextlib.contextmanager
def services(needed: Collection[str], env: Mapping[str, str] | None = None) -> Iterator[infra.Endpoints]:
    """Kafka and/or Redis for the length of the block.

    Services named by ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` in ``env`` are used as they are;
    the others are started by :func:`twotower.infra.up` into a temporary directory on free
    ports and stopped (by :func:`twotower.infra.down`, which stops only what it started) at
    the end, when the directory is removed too.
    """
    env = os.environ if env is None else env
    state = Path(tempfile.mkdtemp(prefix="twotower-bench-infra-"))
    kafka_port, controller_port, redis_port = free_ports(3)
    started = time.monotonic()
    try:
        endpoints = infra.up(
            state,
            kafka_port=kafka_port,
            controller_port=controller_port,
            redis_port=redis_port,
            services=list(needed),
            env=env,
        )
        log.info("services ready in %.1f s: %s", time.monotonic() - started, endpoints)
        yield endpoints
    finally:
        infra.down(state, services=list(needed))
        shutil.rmtree(state, ignore_errors=True)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Call ``predicate`` until it returns something truthy (returned), at most ``timeout_s``.

    Raises:
        TimeoutError: naming ``what``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def http_json(client: httpx.Client, url: str, **params: Any) -> tuple[int, Any]:
    """(status, decoded JSON or None) of a GET; status 0 when the server cannot be reached."""
    try:
        response = client.get(url, params=params or None)
    except httpx.HTTPError:
        return 0, None
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(url: str, timeout_s: float = 5.0) -> list[Sample]:
    """Every sample of a Prometheus endpoint (empty when unreachable)."""
    try:
        text = httpx.get(url, timeout=timeout_s).text
    except httpx.HTTPError:
        return []
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


SNAPSHOT_VERSION = "twotower_retriever_snapshot_version"
"""The retriever's gauge of the snapshot version each of its processes serves (0: none yet)."""


def served_versions(metrics_url: str) -> dict[int | None, int]:
    """The snapshot version each retriever process serves, by pid (``None``: a server of one
    process, whose metrics carry no pid label); empty when its /metrics is unreachable."""
    return {
        int(s.labels["pid"]) if "pid" in s.labels else None: int(s.value)
        for s in scrape(metrics_url)
        if s.name == SNAPSHOT_VERSION
    }


def metric_sum(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def counter_increase(before: Sequence[Sample], after: Sequence[Sample], name: str, **labels: str) -> int:
    """How much a counter (summed over the samples matching ``labels``) grew between two scrapes."""
    return int(metric_sum(after, name, **labels) - metric_sum(before, name, **labels))


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix:`` (a benchmark's own keys on a shared Redis)."""
    client = redis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted


# --- daemons ------------------------------------------------------------------------------------
@contextlib.contextmanager
def running(daemons: Sequence[DaemonProcess]) -> Iterator[None]:
    """Stop ``daemons`` (in reverse order) when the block ends, however it ends."""
    try:
        yield
    finally:
        for daemon in reversed(daemons):
            try:
                daemon.stop()
            except Exception:
                log.exception("stopping %s failed", daemon.name)


# --- a live system: Kafka + Redis + trainer + publisher + retriever -----------------------------
@dataclass(frozen=True)
class SystemOptions:
    """What :func:`live_system` seeds and how the daemons are configured."""

    catalog: int = 1_000
    """Items in the seeded catalogue."""
    categories: int = 20
    """Categories of the seeded catalogue (each probe user likes two of them)."""
    users: int = 200
    """Warm users (the freshness probes click as them; nobody else does)."""
    warm_clicks: int = 5
    """Clicks of each warm user on items of its two categories before the probes."""
    background_rate: float = 20.0
    """Events per second (30 % clicks, 70 % impressions) of other users while the system runs."""
    background_users: int = 200
    env_overrides: dict[str, str] = field(default_factory=dict)
    """Extra ``TWOTOWER_<SECTION>__<FIELD>`` settings for every daemon (none: default settings)."""
    seed: int = 0
    ready_timeout_s: float = 180.0
    state_users: int = 0
    """Users the trainer already knows when it starts (0: none, it starts from scratch): before
    the daemons start, a checkpoint is written into its state dir holding this many users
    (``seeded0000000`` …, nobody clicks as them) with an ID row, a profile and a full history
    over the seeded catalogue, and the catalogue's items (see
    :func:`bench.checkpoint.seeded_checkpoint`). The trainer resumes from it, so every
    checkpoint it writes, and every version the publisher builds, is that much bigger."""


@dataclass(frozen=True)
class CheckpointLogLine:
    """One write of the streaming trainer, a full checkpoint or a row update, as its log reports
    it (at DEBUG)."""

    ts: float
    """Unix time of the log line (the write's end; a full checkpoint's offsets committed)."""
    seq: int
    took_s: float
    next_s: float
    """Wait from this write's start to the next one's (stretched by ``checkpoint_max_share``)."""
    kind: str = "checkpoint"
    """``checkpoint`` (full) or ``row update``."""

    @property
    def started(self) -> float:
        return self.ts - self.took_s


@dataclass(frozen=True)
class PublishLogLine:
    """One version the publisher wrote, as its log reports it."""

    ts: float
    """Unix time of the log line (the version is in Redis)."""
    version: int
    kind: str
    trainer_seq: int


CHECKPOINT_MSG = re.compile(r"^(checkpoint|row update) seq (\d+) in ([0-9.]+) s; next in ([0-9.]+) s$")


class JsonLogTail:
    """Reads a daemon's JSON-lines log incrementally (each call: the complete lines added since)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out


class LiveSystem:
    """The running daemons, the bench's Kafka producer and what was seeded (use :func:`live_system`)."""

    def __init__(self, opts: SystemOptions, endpoints: infra.Endpoints, workdir: Path) -> None:
        self.opts = opts
        self.tag = f"bench{int(time.time())}{os.getpid() % 1000:03d}"
        self.workdir = workdir
        (self.retriever_port,) = free_ports(1)
        self.base_url = f"http://{HOST}:{self.retriever_port}"
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(
            {
                **endpoints.as_env(),
                "TWOTOWER_KAFKA__TOPIC_PREFIX": f"{self.tag}-",
                "TWOTOWER_REDIS__KEY_PREFIX": self.tag,
                "TWOTOWER_TRAINER__STATE_DIR": str(workdir / "trainer"),
                "TWOTOWER_TRAINER__GROUP_ID": f"{self.tag}-trainer",
                "TWOTOWER_PUBLISHER__GROUP_ID": f"{self.tag}-publisher",
                "TWOTOWER_RETRIEVER__HOST": HOST,
                "TWOTOWER_RETRIEVER__PORT": str(self.retriever_port),
                "TWOTOWER_OBSERVABILITY__LOG_FORMAT": "json",
                **opts.env_overrides,
            }
        )
        self.env = env
        self.cfg = load_config(env=env)
        self.redis_url = endpoints.redis_url
        trainer_metrics, publisher_metrics = free_ports(2)
        self.trainer_metrics_url = f"http://{HOST}:{trainer_metrics}/metrics"
        self.publisher_metrics_url = f"http://{HOST}:{publisher_metrics}/metrics"
        self.daemon_env: dict[str, dict[str, str]] = {
            # the trainer logs each checkpoint's duration at DEBUG (its only DEBUG line)
            "trainer": {
                "TWOTOWER_OBSERVABILITY__METRICS_PORT": str(trainer_metrics),
                "TWOTOWER_OBSERVABILITY__LOG_LEVEL": "DEBUG",
            },
            "publisher": {"TWOTOWER_OBSERVABILITY__METRICS_PORT": str(publisher_metrics)},
        }
        self.daemons = [
            DaemonProcess("trainer", ["train", "stream"], workdir / "logs" / "trainer.log"),
            DaemonProcess("publisher", ["publish"], workdir / "logs" / "publisher.log"),
            DaemonProcess(
                "retriever", ["serve", "--port", str(self.retriever_port)], workdir / "logs" / "retriever.log"
            ),
        ]
        self.rng = random.Random(opts.seed)
        self.item_category: dict[str, str] = {}
        self.category_items: dict[str, list[str]] = {}
        self.user_homes: dict[str, tuple[str, str]] = {}
        self.producer: Any = None
        self._bg_stop = threading.Event()
        self._bg_thread: Any = None
        self.background_sent = 0
        self.seeded_state: dict[str, Any] | None = None
        self._trainer_log = JsonLogTail(workdir / "logs" / "trainer.log")
        self._publisher_log = JsonLogTail(workdir / "logs" / "publisher.log")
        self.checkpoints: list[CheckpointLogLine] = []
        """Every checkpoint the trainer logged so far (oldest first; see :meth:`read_logs`)."""
        self.publishes: list[PublishLogLine] = []
        """Every version the publisher logged so far (oldest first)."""

    # --- events -------------------------------------------------------------------------
    def send(self, record: Record, wait: bool = True) -> None:
        """Produce one record to its topic (waiting for the broker's ack when ``wait``)."""
        topics = Topics(self.cfg.kafka.topic_prefix)
        if isinstance(record, Interaction):
            topic = topics.events
        elif isinstance(record, CatalogItem):
            topic = topics.catalog
        else:
            topic = topics.profiles
        future = send_record(self.producer, topic, record)
        if wait:
            future.get(timeout=30)

    def click(self, user_id: str, item_id: str, kind: str = "click", ts_ms: int | None = None) -> Interaction:
        """An interaction record (a click by default) at ``ts_ms`` (default: now)."""
        return Interaction(
            event_id=uuid_hex(),
            request_id=uuid_hex(),
            user_id=user_id,
            item_id=item_id,
            type=kind,
            position=0,
            ts_ms=int(time.time() * 1000) if ts_ms is None else ts_ms,
        )

    def catalog_item(self, item_id: str, category: str) -> CatalogItem:
        """A catalogue record with random content features, timestamped now."""
        features = [self.rng.gauss(0.0, 1.0) for _ in range(self.cfg.model.content_dim)]
        return CatalogItem(item_id, category, features, int(time.time() * 1000), title=f"title of {item_id}")

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        ensure_topics(self.cfg.kafka)
        self.producer = make_producer(self.cfg.kafka, client_id="twotower-bench")
        opts = self.opts
        catalog = []
        for j in range(opts.catalog):
            item_id, category = f"it{j}", f"cat{j % opts.categories}"
            self.item_category[item_id] = category
            self.category_items.setdefault(category, []).append(item_id)
            catalog.append(self.catalog_item(item_id, category))
        if opts.state_users > 0:
            self.seed_trainer_state(catalog)
        for daemon in self.daemons:
            daemon.start({**self.env, **self.daemon_env.get(daemon.name, {})})
        for record in catalog:
            self.send(record, wait=False)
        categories = sorted(self.category_items)
        for i in range(opts.users):
            user = f"user{i}"
            homes = tuple(self.rng.sample(categories, 2))
            self.user_homes[user] = homes  # type: ignore[assignment]
            for _ in range(opts.warm_clicks):
                self.send(self.click(user, self.rng.choice(self.category_items[self.rng.choice(homes)])), wait=False)
        self.producer.flush(timeout=60)
        log.info("seeded %d items and %d warm users; waiting for the retriever", opts.catalog, opts.users)
        started = time.monotonic()
        with httpx.Client(timeout=5.0) as http:

            def ready() -> bool:
                for daemon in self.daemons:
                    daemon.check_alive()
                status, body = http_json(http, f"{self.base_url}/ready")
                return status == 200 and body["items"] >= opts.catalog

            wait_until(ready, opts.ready_timeout_s, "the retriever to serve the seeded catalogue", 0.5)
        log.info("system ready in %.1f s", time.monotonic() - started)
        if opts.background_rate > 0:
            self._bg_thread = threading.Thread(target=self._background, name="background", daemon=True)
            self._bg_thread.start()

    def seed_trainer_state(self, catalog: Sequence[CatalogItem]) -> None:
        """Write the checkpoint of ``opts.state_users`` users the trainer will resume from."""
        from bench.checkpoint import seeded_checkpoint
        from twotower import checkpoint

        started = time.perf_counter()
        ckpt = seeded_checkpoint(self.opts.state_users, catalog, self.cfg.model, self.cfg.trainer, self.opts.seed)
        built = time.perf_counter()
        path = checkpoint.save(self.cfg.trainer.state_dir, ckpt)
        self.seeded_state = {
            "users": len(ckpt.users.ids),
            "items": len(ckpt.items.ids),
            "history_entries": int(ckpt.histories.offsets[-1]),
            "seq": ckpt.seq,
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "build_s": round(built - started, 2),
            "save_s": round(time.perf_counter() - built, 2),
        }
        log.info("seeded the trainer's state: %s", self.seeded_state)

    def read_logs(self) -> None:
        """Take the trainer's checkpoints and the publisher's versions logged since the last call."""
        for record in self._trainer_log.read():
            match = CHECKPOINT_MSG.match(str(record.get("msg", "")))
            if match:
                kind, seq, took, wait = match.groups()
                self.checkpoints.append(
                    CheckpointLogLine(float(record["ts"]), int(seq), float(took), float(wait), kind)
                )
        for record in self._publisher_log.read():
            if "version" in record and "trainer_seq" in record and "kind" in record:
                self.publishes.append(
                    PublishLogLine(
                        float(record["ts"]), int(record["version"]), record["kind"], int(record["trainer_seq"])
                    )
                )

    def checkpoint_cycle_s(self) -> float:
        """The trainer's current wait between checkpoint starts (its last log line; the configured
        interval before there is one)."""
        self.read_logs()
        if self.checkpoints:
            return max(self.cfg.trainer.checkpoint_interval_s, self.checkpoints[-1].next_s)
        return self.cfg.trainer.checkpoint_interval_s

    def _background(self) -> None:
        """Other users' traffic at ``background_rate`` events/s until stopped."""
        interval = 1.0 / self.opts.background_rate
        rng = random.Random(self.opts.seed + 1)
        items = list(self.item_category)
        next_at = time.monotonic()
        while not self._bg_stop.is_set():
            user = f"bg{rng.randrange(self.opts.background_users)}"
            kind = "click" if rng.random() < 0.3 else "impression"
            try:
                self.send(self.click(user, rng.choice(items), kind), wait=False)
                self.background_sent += 1
            except Exception:
                log.exception("background send failed")
            next_at += interval
            self._bg_stop.wait(max(0.0, next_at - time.monotonic()))

    def check_alive(self) -> None:
        for daemon in self.daemons:
            daemon.check_alive()

    def stop(self) -> None:
        self._bg_stop.set()
        if self._bg_thread is not None:
            self._bg_thread.join(10)
        try:
            if self.producer is not None:
                self.producer.close(timeout=10)
        finally:
            for daemon in reversed(self.daemons):
                try:
                    daemon.stop()
                except Exception:
                    log.exception("stopping %s failed", daemon.name)

    def describe(self) -> dict[str, Any]:
        """What the report says about the system under test."""
        return {
            "catalog": self.opts.catalog,
            "categories": self.opts.categories,
            "warm_users": self.opts.users,
            "background_rate_per_s": self.opts.background_rate,
            "background_events_sent": self.background_sent,
            "settings": dict(self.opts.env_overrides) or "defaults",
            "trainer_checkpoint_interval_s": self.cfg.trainer.checkpoint_interval_s,
            "trainer_out_of_order_ms": self.cfg.trainer.out_of_order_ms,
            "publisher_poll_interval_s": self.cfg.publisher.poll_interval_s,
            "retriever_workers": self.cfg.retriever.workers,
            "state_users": self.opts.state_users,
            "seeded_state": self.seeded_state,
            "trainer_log_level": "DEBUG (its checkpoint durations)",
            "logs": str(self.workdir / "logs"),
        }


def uuid_hex() -> str:
    return os.urandom(8).hex()


@contextlib.contextmanager
def live_system(
    opts: SystemOptions, env: Mapping[str, str] | None = None, keep_logs: Path | None = None
) -> Iterator[LiveSystem]:
    """Kafka, Redis and the trainer, publisher and retriever daemons, seeded and ready.

    Args:
        opts: what to seed and how to configure the daemons.
        env: where ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` may name running services (default
            ``os.environ``).
        keep_logs: copy the daemons' logs there at the end (they live in a temporary directory).
    """
    with services(["kafka", "redis"], env) as endpoints, tempfile.TemporaryDirectory(prefix="twotower-bench-") as tmp:
        system = LiveSystem(opts, endpoints, Path(tmp))
        try:
            system.start()
            yield system
        finally:
            system.stop()
            with contextlib.suppress(Exception):
                delete_prefix(endpoints.redis_url, system.tag)
            if keep_logs is not None:
                shutil.copytree(Path(tmp) / "logs", keep_logs, dirs_exist_ok=True)


def run_on_live_system(
    name: str, opts: SystemOptions, measure: Callable[[LiveSystem], dict[str, Any]], keep_logs: Path | None = None
) -> dict[str, Any]:
    """Start the system, ``measure`` it, stop everything; the benchmark's JSON report."""
    run_info = provenance()
    machine = machine_info()
    started = time.monotonic()
    with live_system(opts, keep_logs=keep_logs) as system:
        figures = measure(system)
        described = system.describe()
    return {
        "benchmark": name,
        "provenance": run_info,
        **figures,
        "system": described,
        "wall_s": round(time.monotonic() - started, 1),
        "machine": {**machine, "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }


LOAD_STARTED = "load started"
"""What a spawned load generator puts on its queue first, with its ``time.monotonic()``, as it
sends its first request (:func:`spawned_result`). The clock is the machine's (``CLOCK_MONOTONIC``),
the same in every process."""


def spawned_result(
    target: Callable[..., None],
    args: tuple[Any, ...],
    timeout_s: float,
    what: str,
    on_start: Callable[[float], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> Any:
    """Run ``target(*args, out)`` in a spawned process (its own interpreter and GIL, as a load
    generator needs) and return the one result it puts on the queue ``out``.

    A target that first puts ``(LOAD_STARTED, t)`` has ``on_start(t)`` called (in this thread)
    as soon as that arrives: what must run beside the load (the swaps) starts with the load, not
    a second earlier, before the spawned interpreter has started and imported its modules.
    ``on_end()`` is called as soon as the result arrives, before the process is reaped (its
    exit takes most of a second here): what is read at the load's end is read then.

    Raises:
        RuntimeError: nothing arrived within ``timeout_s`` (the process is killed), or the
            process exited without a result (said within a second, not at the timeout).
    """
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out), daemon=True)
    deadline = time.monotonic() + timeout_s

    def next_message() -> Any:
        # a process that died (an exception, a crash) puts nothing more: say so at once
        while True:
            try:
                return out.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{what} returned nothing in {timeout_s:.0f} s") from None
                if not proc.is_alive() and out.empty():
                    raise RuntimeError(f"{what} exited (code {proc.exitcode}) without a result") from None

    proc.start()
    try:
        result = next_message()
        if isinstance(result, tuple) and result[:1] == (LOAD_STARTED,):
            if on_start is not None:
                on_start(result[1])
            result = next_message()
        if on_end is not None:
            on_end()
        return result
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
