"""The local infrastructure: config rendering, process bookkeeping, and the live services."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from twotower import infra
from twotower.config import Config


def _parse_properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_properties_single_node_kraft(tmp_path: Path) -> None:
    props = _parse_properties(
        infra.render_server_properties(port=19092, controller_port=19093, log_dir=tmp_path / "data")
    )
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["log.dirs"] == str(tmp_path / "data")
    assert props["group.initial.rebalance.delay.ms"] == "0"
    # One node cannot hold three replicas of the internal topics.
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    ):
        assert props[key] == "1", key


def test_pom_pins_kafka_and_logging() -> None:
    pom = infra.render_pom("4.3.1", "2.25.4")
    assert "<artifactId>kafka_2.13</artifactId>\n      <version>4.3.1</version>" in pom
    assert "<artifactId>log4j-slf4j-impl</artifactId>\n      <version>2.25.4</version>" in pom


def test_export_line_is_shell_evaluable() -> None:
    line = infra.Endpoints("127.0.0.1:9092", "redis://127.0.0.1:6379/0").export_line()
    assert line == "export KAFKA_BOOTSTRAP=127.0.0.1:9092 REDIS_URL=redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("mismatch", ["start_ticks", "exe"])
def test_down_leaves_a_foreign_process_alone(tmp_path: Path, mismatch: str) -> None:
    """A pid file whose pid is now some other process must not get that process killed."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stat = Path(f"/proc/{other.pid}/stat").read_text()
        record = {
            "pid": other.pid,
            "start_ticks": int(stat[stat.rindex(")") + 2 :].split()[19]),
            "marker": str(tmp_path / "kafka" / "server.properties"),
            "endpoint": "127.0.0.1:1",
            "log_file": str(tmp_path / "kafka" / "broker.log"),
            "exe": os.readlink(f"/proc/{other.pid}/exe"),
            "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        }
        (tmp_path / "kafka.pid").write_text(json.dumps(record))
        assert infra.status(tmp_path)["kafka"].running is True  # sanity: a full match is "ours"
        record[mismatch] = 1 if mismatch == "start_ticks" else "/usr/lib/jvm/bin/java"
        (tmp_path / "kafka.pid").write_text(json.dumps(record))
        assert infra.status(tmp_path)["kafka"].running is False
        infra.down(tmp_path, timeout_s=1)
        time.sleep(0.2)
        assert other.poll() is None
        assert not (tmp_path / "kafka.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_up_rejects_unknown_service(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown services"):
        infra.up(tmp_path, services=["zookeeper"])


@pytest.mark.integration
def test_kafka_produce_and_consume(kafka_bootstrap: str, config: Config) -> None:
    topic = f"{config.kafka.topic_prefix}roundtrip"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        producer.send(topic, key=b"u1", value=b"hello", timestamp_ms=1_700_000_000_000).get(timeout=30)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{config.kafka.topic_prefix}group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    try:
        received = []
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=500).values():
                received.extend(messages)
        consumer.commit()  # the group coordinator works on a single node
    finally:
        consumer.close()
    assert [(m.key, m.value, m.timestamp) for m in received] == [(b"u1", b"hello", 1_700_000_000_000)]


@pytest.mark.integration
def test_redis_set_and_get(redis_url: str, config: Config) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"{config.redis.key_prefix}:greeting"
    try:
        client.set(key, b"hello", ex=60)
        assert client.get(key) == b"hello"
    finally:
        client.delete(key)
        client.close()


@pytest.mark.integration
def test_up_uses_given_endpoints_and_starts_nothing(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    env = {"KAFKA_BOOTSTRAP": kafka_bootstrap, "REDIS_URL": redis_url}
    endpoints = infra.up(tmp_path, env=env, timeout_s=10)
    assert endpoints == infra.Endpoints(kafka_bootstrap, redis_url)
    assert not list(tmp_path.glob("*.pid"))


@pytest.mark.integration
def test_redis_lifecycle_up_is_idempotent_and_down_stops_it(tmp_path: Path) -> None:
    port = _unused_port()
    first = infra.up(tmp_path, redis_port=port, services=["redis"], env={})
    try:
        pid = infra.status(tmp_path)["redis"].pid
        again = infra.up(tmp_path, redis_port=port, services=["redis"], env={})
        assert again == first
        assert infra.status(tmp_path)["redis"].pid == pid
        assert redis.Redis.from_url(first.redis_url).ping()
    finally:
        infra.down(tmp_path)
    assert infra.status(tmp_path)["redis"].running is False
    assert not Path(f"/proc/{pid}").exists()


def test_status_and_down_explain_a_state_dir_that_is_not_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    afile = tmp_path / "afile"
    afile.write_text("")
    runner = CliRunner()
    result = runner.invoke(infra.app, ["status", "--state-dir", str(afile)])
    assert result.exit_code == 2 and "is a file" in " ".join(result.output.replace("│", " ").split())
    result = runner.invoke(infra.app, ["down", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 0 and "no services were started from" in result.output


@pytest.mark.skipif(bool(os.environ.get("REDIS_URL")), reason="a session given REDIS_URL starts no Redis")
def test_a_test_session_ended_by_sigterm_stops_its_services(tmp_path: Path) -> None:
    """A CI timeout's SIGTERM ended pytest at once, and the session's Redis (and Kafka), in
    sessions of their own, ran on with no pid file left to find them by."""
    conftest = Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    (tmp_path / "test_waits.py").write_text(
        "import time\n\ndef test_waits(redis_url):\n    print('URL', redis_url, flush=True)\n    time.sleep(120)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "KAFKA_BOOTSTRAP")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_waits.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("URL "):
                url = line.split()[1]
                break
        assert url is not None, "the inner session never reached its test"
        client = redis.Redis.from_url(url)
        assert client.ping()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                client.ping()
            except redis.ConnectionError:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the Redis at {url} outlived the session that started it")
    finally:
        if proc.poll() is None:
            proc.kill()
