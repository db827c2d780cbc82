"""``twotower demo``: the whole system on one machine, with a simulated click stream.

Brings up Kafka and Redis (unless ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` name running ones),
starts every daemon as its own process (trainer, scheduler, publisher, retriever, simulator
in closed loop with the retriever), shows a live view built from the daemons' own
Prometheus endpoints, and stops everything cleanly after ``--duration`` or Ctrl-C. The last
line of output is one JSON object; the exit code is 0 only if events flowed through every
stage and the served recommendations beat random ones on the simulator's ground truth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import typer
from kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from twotower import infra
from twotower.config import Config, KafkaConfig, load_config
from twotower.kafka_io import Topics, ensure_topics, make_consumer
from twotower.processes import DaemonProcess, wait_healthy

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 180.0
# Daemons in start order; the simulator comes last and stops first.
DAEMONS: dict[str, list[str]] = {
    "trainer": ["train", "stream"],
    "publisher": ["publish"],
    "retriever": ["serve"],
    "scheduler": ["schedule"],
    "simulator": ["produce", "simulate"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def count_records(cfg: KafkaConfig, topic: str) -> int:
    """Records in ``topic`` (sum of end minus beginning offsets): what really reached Kafka."""
    consumer = make_consumer(cfg, None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends, starts = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        consumer.close()


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float] | None:
    """Prometheus metrics at ``url`` summed over labels, by sample name; None if unreachable."""
    try:
        text = httpx.get(url, timeout=timeout_s).text
    except httpx.HTTPError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if key.endswith("_total") or not sample.labels or family.type in ("counter", "gauge"):
                out[key] = out.get(key, 0.0) + sample.value
            label_key = key + "{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}"
            out[label_key] = sample.value
    return out


@dataclass
class Daemon(DaemonProcess):
    """A daemon of the demo, with the endpoints its figures and health are read from."""

    metrics_url: str = ""
    health_url: str = ""
    last: dict[str, float] = field(default_factory=dict)

    def refresh(self) -> None:
        got = scrape(self.metrics_url)
        if got is not None:
            self.last = got


@dataclass
class Totals:
    """The demo's figures, from the daemons' metrics."""

    events_produced: float = 0
    events_trained: float = 0
    clicks_trained: float = 0
    snapshots_published: float = 0
    snapshot_version: float = 0
    recommendations_served: float = 0
    served_hits: float = 0
    served_requests: float = 0
    random_hits: float = 0
    random_requests: float = 0
    consumer_lag: float = 0
    dead_letters: float = 0

    @staticmethod
    def of(daemons: Mapping[str, Daemon]) -> Totals:
        sim, trn = daemons["simulator"].last, daemons["trainer"].last
        pub, ret = daemons["publisher"].last, daemons["retriever"].last
        return Totals(
            events_produced=sim.get("twotower_sim_events_total{type=impression}", 0)
            + sim.get("twotower_sim_events_total{type=click}", 0),
            events_trained=trn.get("twotower_trainer_events_total{kind=impression}", 0)
            + trn.get("twotower_trainer_events_total{kind=click}", 0),
            clicks_trained=trn.get("twotower_trainer_examples_total", 0),
            snapshots_published=pub.get("twotower_publisher_versions_total", 0),
            snapshot_version=ret.get("twotower_retriever_snapshot_version", 0),
            recommendations_served=ret.get("twotower_retriever_requests_total{status=200}", 0),
            served_hits=sim.get("twotower_sim_served_hits_total", 0),
            served_requests=sim.get("twotower_sim_served_requests_total", 0),
            random_hits=sim.get("twotower_sim_random_hits_total", 0),
            random_requests=sim.get("twotower_sim_random_requests_total", 0),
            consumer_lag=trn.get("twotower_trainer_consumer_lag", 0),
            dead_letters=trn.get("twotower_dead_letters_total", 0),
        )

    @property
    def served_hit_rate(self) -> float:
        return self.served_hits / self.served_requests if self.served_requests else 0.0

    @property
    def random_hit_rate(self) -> float:
        return self.random_hits / self.random_requests if self.random_requests else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "events_produced": int(self.events_produced),
            "events_trained": int(self.events_trained),
            "clicks_trained": int(self.clicks_trained),
            "snapshots_published": int(self.snapshots_published),
            "snapshot_version": int(self.snapshot_version),
            "recommendations_served": int(self.recommendations_served),
            "served_hit_rate": round(self.served_hit_rate, 4),
            "random_hit_rate": round(self.random_hit_rate, 4),
            "served_requests": int(self.served_requests),
            "dead_letters": int(self.dead_letters),
        }


def render(totals: Totals, previous: Totals, dt_s: float, elapsed_s: float, daemons: Mapping[str, Daemon]) -> Table:
    table = Table(title=f"twotower demo — {elapsed_s:5.0f} s", expand=False)
    table.add_column("stage")
    table.add_column("total", justify="right")
    table.add_column("per second", justify="right")
    table.add_column("process")

    def rate(now: float, before: float) -> str:
        return f"{(now - before) / dt_s:8.1f}" if dt_s > 0 else "-"

    rows = [
        ("simulator: events produced", totals.events_produced, previous.events_produced, "simulator"),
        ("trainer: events consumed", totals.events_trained, previous.events_trained, "trainer"),
        ("trainer: clicks trained", totals.clicks_trained, previous.clicks_trained, "trainer"),
        ("publisher: snapshots", totals.snapshots_published, previous.snapshots_published, "publisher"),
        ("retriever: recommendations", totals.recommendations_served, previous.recommendations_served, "retriever"),
    ]
    for label, now, before, proc in rows:
        state = "up" if daemons[proc].alive() else "[red]down[/red]"
        table.add_row(label, f"{now:,.0f}", rate(now, before), state)
    table.add_row("trainer consumer lag", f"{totals.consumer_lag:,.0f}", "", "")
    table.add_row("snapshot version served", f"{totals.snapshot_version:,.0f}", "", "")
    table.add_row(
        "hit rate served / random",
        f"{totals.served_hit_rate:.3f} / {totals.random_hit_rate:.3f}",
        "",
        f"n={totals.served_requests:,.0f}",
    )
    return table


def run_demo(duration_s: float, rate: float | None, state_root: Path, console: Console) -> tuple[int, dict]:
    """Run the demo; returns (exit code, summary)."""
    cfg = load_config()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    run_dir = (state_root / run_id).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    infra_dir = state_root / "infra"
    # a SIGTERM (a timeout, a cancelled job) ends the demo through its cleanup below: its
    # daemons and services run in sessions of their own and would outlive it
    # (a closed terminal's SIGHUP too)
    previous = {signum: signal.signal(signum, _exit_on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}
    daemons: dict[str, Daemon] = {}
    # free ports: a machine that already runs a Redis or Kafka on the usual ones (Debian starts
    # the redis-server it installs) must not stop the demo; running services are reused as they are
    kafka_port, controller_port, redis_port = infra.free_ports(3)
    try:
        console.print(f"[bold]bringing up Kafka and Redis[/bold] (state in {infra_dir}) …")
        with infra.running(
            infra_dir, kafka_port=kafka_port, controller_port=controller_port, redis_port=redis_port
        ) as endpoints:  # stops at the end what it started
            try:
                return _run_stages(cfg, endpoints, run_id, run_dir, daemons, duration_s, rate, console)
            finally:
                for signum in previous:
                    signal.signal(signum, signal.SIG_IGN)  # the cleanup is not to be cut short
                for daemon in daemons.values():
                    daemon.stop(timeout_s=10)  # already stopped after a normal run; this covers failures
    except infra.InfraError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1, {"ok": False, "error": str(exc).splitlines()[0]}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_stages(
    cfg: Config,
    endpoints: infra.Endpoints,
    run_id: str,
    run_dir: Path,
    daemons: dict[str, Daemon],
    duration_s: float,
    rate: float | None,
    console: Console,
) -> tuple[int, dict]:
    """Start every daemon into ``daemons`` (the caller stops them), run the stream, summarise."""
    env = dict(os.environ)
    env.update(
        {
            "KAFKA_BOOTSTRAP": endpoints.kafka_bootstrap,
            "REDIS_URL": endpoints.redis_url,
            "TWOTOWER_KAFKA__TOPIC_PREFIX": f"demo-{run_id}-",
            "TWOTOWER_REDIS__KEY_PREFIX": f"demo-{run_id}",
            "TWOTOWER_TRAINER__STATE_DIR": str(run_dir / "trainer"),
            "TWOTOWER_OBSERVABILITY__LOG_FORMAT": "json",
        }
    )
    topics_cfg = cfg.with_overrides(
        {"kafka": {"bootstrap": endpoints.kafka_bootstrap, "topic_prefix": env["TWOTOWER_KAFKA__TOPIC_PREFIX"]}}
    )
    ensure_topics(topics_cfg.kafka)
    retriever_port = free_port()
    retriever_url = f"http://127.0.0.1:{retriever_port}"
    for name, args in DAEMONS.items():
        port = retriever_port if name == "retriever" else free_port()
        extra_args = list(args)
        if name == "retriever":
            extra_args += ["--port", str(port)]
        if name == "simulator":
            extra_args += ["--retriever-url", retriever_url]
            if rate is not None:
                extra_args += ["--rate", str(rate)]
        daemons[name] = Daemon(
            name,
            extra_args,
            run_dir / "logs" / f"{name}.log",
            metrics_url=f"http://127.0.0.1:{port}/metrics",
            health_url=f"http://127.0.0.1:{port}/health",
        )
        proc_env = dict(env)
        if name != "retriever":
            proc_env["TWOTOWER_OBSERVABILITY__METRICS_PORT"] = str(port)
        if name == "simulator":
            # the stream starts once every other daemon answers, so --duration is all traffic
            wait_healthy([(d, d.health_url) for n, d in daemons.items() if n != "simulator"], STARTUP_TIMEOUT_S)
        daemons[name].start(proc_env)
    wait_healthy([(daemons["simulator"], daemons["simulator"].health_url)], STARTUP_TIMEOUT_S)
    console.print(f"all daemons up; logs in {run_dir / 'logs'}")
    summary = _watch(daemons, duration_s, console)
    summary["events_produced"] = count_records(topics_cfg.kafka, Topics(topics_cfg.kafka.topic_prefix).events)
    # uvicorn re-raises the SIGTERM it handled after its graceful shutdown: that exit is clean too.
    clean = (0, None, -signal.SIGTERM)
    failed = [n for n, d in daemons.items() if d.process is not None and d.process.returncode not in clean]
    summary["daemons_failed"] = failed
    summary["logs"] = str(run_dir / "logs")
    ok = (
        summary["events_produced"] > 0
        and summary["events_trained"] > 0
        and summary["snapshots_published"] > 0
        and summary["recommendations_served"] > 0
        and summary["served_hit_rate"] > summary["random_hit_rate"]
        and not failed
    )
    summary["ok"] = ok
    return (0 if ok else 1), summary


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _watch(daemons: dict[str, Daemon], duration_s: float, console: Console) -> dict:
    stop = {"now": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    previous, prev_t = Totals(), start
    totals = Totals()
    interactive = console.is_terminal
    last_print = start
    try:
        view = Live(console=console, refresh_per_second=2) if interactive else contextlib.nullcontext()
        with view as live:
            while not stop["now"] and time.monotonic() - start < duration_s:
                time.sleep(1.0)
                for daemon in daemons.values():
                    daemon.refresh()
                now = time.monotonic()
                totals = Totals.of(daemons)
                if interactive:
                    live.update(render(totals, previous, now - prev_t, now - start, daemons))
                elif now - last_print >= 10:
                    print(json.dumps({"elapsed_s": round(now - start), **totals.summary()}), flush=True)
                    last_print = now
                previous, prev_t = totals, now
                dead = [n for n, d in daemons.items() if not d.alive()]
                if dead:
                    console.print(f"[red]daemon(s) exited early: {', '.join(dead)}[/red]")
                    break
        # Stop the stream first, let the pipeline drain, take final figures, then stop the rest.
        daemons["simulator"].refresh()
        daemons["simulator"].stop()
        time.sleep(3.0)
        for name, daemon in daemons.items():
            if name != "simulator":
                daemon.refresh()
        totals = Totals.of(daemons)
        for name in reversed(list(daemons)):
            if name != "simulator":
                daemons[name].stop()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for daemon in daemons.values():
            daemon.stop(timeout_s=5)
    return totals.summary()


def demo_command(
    duration: float = typer.Option(120.0, "--duration", help="Seconds to run before stopping everything."),
    rate: float | None = typer.Option(None, help="Simulated requests per second (default: simulator.rate_per_s)."),
    state_root: Path = typer.Option(Path("var/demo"), help="Where infra state, trainer state and logs go."),
) -> None:
    """Bring up the whole system with a simulated click stream and show it learning.

    The last line printed is a JSON summary; exit code 0 only if events flowed through every
    stage and served recommendations beat random ones against the simulator's ground truth.
    """
    console = Console(stderr=False)
    code, summary = run_demo(duration, rate, state_root, console)
    console.file.flush()
    print(json.dumps(summary), flush=True)
    raise typer.Exit(code)
