"""Local infrastructure: one Kafka broker and one Redis server, without Docker.

The broker is Apache Kafka assembled from its Maven Central jars (resolved once with
``mvn dependency:copy-dependencies`` into a cache outside the repository) and run as a
single-node KRaft broker+controller; Redis is the Debian ``redis-server`` binary. Both run
detached, in their own process group, with their pid, logs and data under one state
directory, so that :func:`down` stops exactly what :func:`up` started and nothing else.

``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` in the environment name services that already exist;
:func:`up` then starts nothing for them and only checks that they answer.

Layout of a state directory::

    <state>/kafka.pid        JSON record of the broker process (pid, boot id, start time, executable)
    <state>/kafka/           server.properties, log4j2.properties, broker.log, cluster.id, data/
    <state>/redis.pid        JSON record of the Redis process
    <state>/redis/           redis.log and the (unused, persistence is off) data directory
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.3.1"
"""Apache Kafka release run locally (and pinned in deploy/docker-compose.yml); kafka-python 3.0.x
is CI-tested against 4.3 brokers."""
LOG4J_VERSION = "2.25.4"
"""log4j2 release matching the one Kafka 4.3 declares; only the slf4j binding is added by us."""
DEFAULT_STATE_DIR = Path("var/infra")
DEFAULT_KAFKA_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
DEFAULT_REDIS_PORT = 6379
SERVICES = ("kafka", "redis")
HOST = "127.0.0.1"


class InfraError(RuntimeError):
    """A service could not be resolved, started, reached or stopped."""


@dataclass(frozen=True)
class Endpoints:
    """Where clients reach the services."""

    kafka_bootstrap: str
    """host:port list of the Kafka brokers."""
    redis_url: str
    """Redis connection URL."""

    def as_env(self) -> dict[str, str]:
        """The endpoints as the environment variables the configuration reads."""
        return {"KAFKA_BOOTSTRAP": self.kafka_bootstrap, "REDIS_URL": self.redis_url}

    def export_line(self) -> str:
        """A shell line that exports the endpoints (for ``eval "$(twotower infra up)"``)."""
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in self.as_env().items())


@dataclass(frozen=True)
class ServiceStatus:
    """State of one service of a state directory."""

    name: str
    running: bool
    """True if the recorded process is alive and is still the one that was started."""
    pid: int | None
    endpoint: str | None
    log_file: Path | None


@dataclass(frozen=True)
class _ProcessRecord:
    """What is written to ``<name>.pid``: enough to recognise the process later."""

    pid: int
    start_ticks: int
    """Process start time from /proc/<pid>/stat, so a recycled pid is not mistaken for ours."""
    marker: str
    """A path inside the state dir that appears in the command line (for people reading the file)."""
    endpoint: str
    log_file: str
    exe: str = ""
    """Resolved executable of the process (/proc/<pid>/exe) when it was started."""
    boot_id: str = ""
    """Kernel boot id at start: start times are only comparable within one boot."""


# ----------------------------------------------------------------------------- paths and files


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The cache directory for downloaded artifacts: ``$TWOTOWER_CACHE_DIR`` or ``~/.cache/twotower``."""
    env = os.environ if env is None else env
    return Path(env.get("TWOTOWER_CACHE_DIR") or Path.home() / ".cache" / "twotower").expanduser()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- Kafka artifacts


def render_pom(version: str = KAFKA_VERSION, log4j_version: str = LOG4J_VERSION) -> str:
    """A throw-away pom whose runtime dependencies are a runnable Kafka broker classpath."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.twotower</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j_version}</version>
    </dependency>
  </dependencies>
</project>
"""


def resolve_kafka_libs(version: str = KAFKA_VERSION, cache: Path | None = None) -> Path:
    """The directory of the Kafka broker jars, resolved with Maven on first use and reused after.

    Args:
        version: Apache Kafka release (Scala 2.13 build).
        cache: cache directory; ``None`` means :func:`cache_dir`.

    Returns:
        ``<cache>/kafka-<version>/libs``, complete (a ``.complete`` marker guards half-copied dirs).

    Raises:
        InfraError: Maven is missing or the resolution failed (its output is included).
    """
    home = (cache or cache_dir()) / f"kafka-{version}"
    libs = home / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    with _locked(home / ".lock"):
        if marker.exists():  # another process resolved it while we waited
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InfraError("Maven (mvn) is not on PATH; install it (Debian: apt-get install -y maven)")
        (home / "pom.xml").write_text(render_pom(version))
        staging = home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        log.info("resolving Apache Kafka %s jars with Maven into %s", version, libs)
        started = time.monotonic()
        proc = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(home / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not any(staging.glob(f"kafka_2.13-{version}.jar")):
            output = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise InfraError(f"Maven could not resolve org.apache.kafka:kafka_2.13:{version}:\n{output}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker.touch()
        log.info("resolved %d jars in %.1f s", len(list(libs.glob("*.jar"))), time.monotonic() - started)
    return libs


# ----------------------------------------------------------------------------- Kafka config


def render_server_properties(
    *,
    port: int,
    controller_port: int,
    log_dir: Path,
    host: str = HOST,
    node_id: int = 1,
    num_partitions: int = 3,
) -> str:
    """``server.properties`` of a single-node KRaft broker that is also its own controller.

    Internal topics get replication factor 1 (the default of 3 cannot be met by one node and
    leaves the group coordinator unavailable); the initial rebalance delay is 0 so that
    consumer groups form at once.

    Args:
        port: client (PLAINTEXT) port.
        controller_port: KRaft controller port.
        log_dir: where the broker keeps its partitions and metadata log.
        host: interface both listeners bind and the address advertised to clients.
        node_id: KRaft node id.
        num_partitions: default partition count of auto-created topics.
    """
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": f"{node_id}@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": str(num_partitions),
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
    }
    return "".join(f"{key}={value}\n" for key, value in props.items())


LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""
"""Broker logging: INFO to stdout (which goes to ``broker.log``); without a config log4j2 would
print only errors and never the ``Kafka Server started`` line."""


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not value.startswith("-"):
            return value


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise InfraError("java is not on PATH; Kafka 4 needs Java 17+ (Debian: openjdk-17-jre-headless)")
    return java


# ----------------------------------------------------------------------------- processes


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if there is no live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after it are plain.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie is dead: reap it if it is our child
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return int(fields[19])


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _belongs(record: _ProcessRecord) -> bool:
    """True if the recorded pid is alive and is still the process that was started.

    Same boot, same start time and same executable identify the process exactly. (The command
    line is not used: a server may rewrite it, and Redis briefly shows an empty one at startup.)
    """
    if _start_ticks(record.pid) != record.start_ticks:
        return False
    if record.boot_id and record.boot_id != _boot_id():
        return False
    if record.exe:
        return _exe(record.pid) == record.exe
    try:  # a record from an older version of this module, without the executable
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return record.marker in cmdline


def _read_record(state: Path, name: str) -> _ProcessRecord | None:
    path = state / f"{name}.pid"
    try:
        return _ProcessRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable pid file %s: %s", path, exc)
        return None


def free_ports(count: int) -> list[int]:
    """Distinct local ports nobody listens on (all held open at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _spawn(name: str, state: Path, cmd: list[str], marker: str, endpoint: str, log_file: Path) -> _ProcessRecord:
    """Start ``cmd`` detached (new session, so its own process group) and record it."""
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=log_file.parent,
        )
    ticks, exe = _start_ticks(proc.pid), _exe(proc.pid)  # Popen returns after the exec
    if ticks is None or exe is None:
        raise InfraError(f"{name} exited immediately:\n{_tail(log_file)}")
    record = _ProcessRecord(proc.pid, ticks, marker, endpoint, str(log_file), exe=exe, boot_id=_boot_id())
    (state / f"{name}.pid").write_text(json.dumps(asdict(record)))
    # The Popen object is dropped on purpose: the process outlives this call (and this Python
    # process); mark it as handled so Popen.__del__ neither warns nor keeps it on its list.
    proc.returncode = 0
    log.info("started %s (pid %d), log %s", name, proc.pid, log_file)
    return record


def _wait_ready(
    name: str,
    check: Callable[[], bool],
    timeout_s: float,
    record: _ProcessRecord | None = None,
    log_file: Path | None = None,
) -> None:
    """Poll ``check()`` until it is true; fail early if the started process died."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if record is not None and not _belongs(record):
            raise InfraError(f"{name} exited during startup; last lines of {log_file}:\n{_tail(log_file)}")
        try:
            if check():
                return
        except InfraError:
            raise
        except Exception as exc:  # any client error just means "not yet"
            last_error = exc
        time.sleep(0.25)
    where = f"; last lines of {log_file}:\n{_tail(log_file)}" if log_file else ""
    raise InfraError(f"{name} not ready after {timeout_s:.0f} s (last error: {last_error!r}){where}")


def _stop(state: Path, name: str, timeout_s: float) -> None:
    """Stop the recorded process group of ``name`` if it is still ours; remove the pid file."""
    record = _read_record(state, name)
    pid_file = state / f"{name}.pid"
    if record is None:
        return
    if not _belongs(record):
        log.info("%s (pid %d) is not running (or the pid is now another process); nothing to stop", name, record.pid)
        pid_file.unlink(missing_ok=True)
        return
    log.info("stopping %s (pid %d)", name, record.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGTERM)  # the pid leads its own group (new session)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _belongs(record):
        time.sleep(0.1)
    if _belongs(record):
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, record.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _belongs(record):
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- services


def _kafka_ready(bootstrap: str) -> bool:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaConfigurationError

    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not _port_open(host or HOST, int(port)):
        return False  # avoid a noisy client connection attempt before the port even listens
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="twotower-infra",
            request_timeout_ms=5_000,
            bootstrap_timeout_ms=2_000,
        )
    except KafkaConfigurationError as exc:  # a bug, not a broker that is still starting
        raise InfraError(f"invalid Kafka client configuration: {exc}") from exc
    try:
        admin.list_topics()
        return True
    finally:
        admin.close()


def _redis_ready(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


def start_kafka(
    state: Path,
    *,
    port: int = DEFAULT_KAFKA_PORT,
    controller_port: int = DEFAULT_CONTROLLER_PORT,
    version: str = KAFKA_VERSION,
    heap: str = "512m",
    timeout_s: float = 90.0,
) -> str:
    """Start (or reuse) the local broker of ``state`` and wait until a client can use it.

    The storage is formatted once; a later start reuses its data and cluster id.

    Returns:
        The bootstrap address ``host:port``.

    Raises:
        InfraError: the jars cannot be resolved, a port is taken, or the broker does not come up.
    """
    state = state.resolve()
    record = _read_record(state, "kafka")
    if record is not None and _belongs(record):
        log.info("kafka already running (pid %d) at %s", record.pid, record.endpoint)
        _wait_ready("kafka", lambda: _kafka_ready(record.endpoint), timeout_s, record, Path(record.log_file))
        return record.endpoint
    libs = resolve_kafka_libs(version)
    for p in (port, controller_port):
        if _port_open(HOST, p):
            raise InfraError(
                f"port {p} is already in use by another process; choose other ports "
                "or set KAFKA_BOOTSTRAP to use an existing broker"
            )
    home = state / "kafka"
    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    server_props = home / "server.properties"
    server_props.write_text(render_server_properties(port=port, controller_port=controller_port, log_dir=data))
    log4j = home / "log4j2.properties"
    log4j.write_text(LOG4J2_PROPERTIES)
    id_file = home / "cluster.id"
    if not id_file.exists():
        id_file.write_text(_cluster_id())
    java = [_java(), f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*"]
    fmt = subprocess.run(
        [
            *java,
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            id_file.read_text().strip(),
            "-c",
            str(server_props),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if fmt.returncode != 0:
        output = "\n".join((fmt.stdout + fmt.stderr).splitlines()[-20:])
        raise InfraError(f"formatting Kafka storage in {data} failed:\n{output}")
    endpoint = f"{HOST}:{port}"
    log_file = home / "broker.log"
    cmd = [
        java[0],
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        "-Dlog4j2.shutdownHookEnabled=false",  # keep logging while Kafka's own hook shuts down
        f"-Dkafka.logs.dir={home}",
        *java[1:],
        "kafka.Kafka",
        str(server_props),
    ]
    started = time.monotonic()
    record = _spawn("kafka", state, cmd, str(server_props), endpoint, log_file)
    try:
        _wait_ready("kafka", lambda: _kafka_ready(endpoint), timeout_s, record, log_file)
    except BaseException:  # a Ctrl-C or a test timeout too: it runs in a session of its own
        _stop(state, "kafka", timeout_s=10)  # leave no half-started process behind
        raise
    log.info("kafka %s ready at %s in %.1f s", version, endpoint, time.monotonic() - started)
    return endpoint


def _redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InfraError(
            "redis-server is not on PATH; install it (Debian: apt-get install -y redis-server) "
            "or set REDIS_URL to an existing server"
        )
    log.info("redis-server missing; installing the Debian package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"]
    if subprocess.run(install, stdin=subprocess.DEVNULL, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], stdin=subprocess.DEVNULL, env=env, check=False)
        if subprocess.run(install, stdin=subprocess.DEVNULL, env=env, check=False).returncode != 0:
            raise InfraError("apt-get install redis-server failed")
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise InfraError("redis-server still not found after installing it")
    return found


def start_redis(state: Path, *, port: int = DEFAULT_REDIS_PORT, timeout_s: float = 30.0) -> str:
    """Start (or reuse) the local Redis of ``state`` (no persistence) and wait for PING.

    Returns:
        The URL ``redis://host:port/0``.

    Raises:
        InfraError: redis-server is missing and cannot be installed, the port is taken, or it
            does not answer.
    """
    state = state.resolve()
    record = _read_record(state, "redis")
    if record is not None and _belongs(record):
        log.info("redis already running (pid %d) at %s", record.pid, record.endpoint)
        _wait_ready("redis", lambda: _redis_ready(record.endpoint), timeout_s, record, Path(record.log_file))
        return record.endpoint
    binary = _redis_server()
    if _port_open(HOST, port):
        raise InfraError(
            f"port {port} is already in use by another process; choose another port "
            "or set REDIS_URL to use an existing server"
        )
    home = state / "redis"
    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    url = f"redis://{HOST}:{port}/0"
    log_file = home / "redis.log"
    cmd = [
        binary,
        "--port",
        str(port),
        "--bind",
        HOST,
        "--dir",
        str(data),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--set-proc-title",
        "no",  # keep the command line as started, so `ps` shows which state dir it serves
        "--logfile",
        "",
    ]
    record = _spawn("redis", state, cmd, str(data), url, log_file)
    try:
        _wait_ready("redis", lambda: _redis_ready(url), timeout_s, record, log_file)
    except BaseException:  # a Ctrl-C or a test timeout too: it runs in a session of its own
        _stop(state, "redis", timeout_s=10)  # leave no half-started process behind
        raise
    log.info("redis ready at %s", url)
    return url


def up(
    state_dir: Path | str = DEFAULT_STATE_DIR,
    *,
    kafka_port: int = DEFAULT_KAFKA_PORT,
    controller_port: int | None = None,
    redis_port: int = DEFAULT_REDIS_PORT,
    services: Collection[str] = SERVICES,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 90.0,
) -> Endpoints:
    """Make Kafka and Redis available, starting local ones where the environment names none.

    Idempotent: services already running from ``state_dir`` are reused (with the ports they
    were started on). ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` in ``env`` are used as they are
    (after checking that they answer) and nothing is started for them.

    Args:
        state_dir: where pid files, logs and data live.
        kafka_port: client port of a started broker.
        controller_port: KRaft controller port; ``None`` means 9093 if ``kafka_port`` is the
            default 9092, else ``kafka_port + 1``.
        redis_port: port of a started Redis.
        services: which of ``"kafka"`` and ``"redis"`` to provide; the endpoint of one left
            out is an empty string.
        env: environment to read the two variables from; ``None`` means ``os.environ``.
        timeout_s: how long each service may take to answer.

    Raises:
        InfraError: a service cannot be started or does not answer in time.
    """
    env = os.environ if env is None else env
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown services {sorted(unknown)}; choose from {SERVICES}")
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if controller_port is None:
        controller_port = DEFAULT_CONTROLLER_PORT if kafka_port == DEFAULT_KAFKA_PORT else kafka_port + 1
    bootstrap = url = ""
    with _locked(state / ".lock"):
        if "kafka" in services:
            if env.get("KAFKA_BOOTSTRAP"):
                bootstrap = env["KAFKA_BOOTSTRAP"]
                log.info("using KAFKA_BOOTSTRAP=%s; no broker started", bootstrap)
                _wait_ready(f"kafka at {bootstrap}", lambda: _kafka_ready(bootstrap), timeout_s)
            else:
                bootstrap = start_kafka(state, port=kafka_port, controller_port=controller_port, timeout_s=timeout_s)
        if "redis" in services:
            if env.get("REDIS_URL"):
                url = env["REDIS_URL"]
                log.info("using REDIS_URL=%s; no redis started", url)
                _wait_ready(f"redis at {url}", lambda: _redis_ready(url), timeout_s)
            else:
                url = start_redis(state, port=redis_port, timeout_s=timeout_s)
    return Endpoints(kafka_bootstrap=bootstrap, redis_url=url)


def down(
    state_dir: Path | str = DEFAULT_STATE_DIR, *, services: Collection[str] = SERVICES, timeout_s: float = 30.0
) -> None:
    """Stop the services :func:`up` started from ``state_dir``; data and logs are kept.

    Only a process whose boot, pid, start time and executable match its pid file is signalled
    (its whole process group: SIGTERM, then SIGKILL after ``timeout_s``). Stale pid files are
    removed. Services given by ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` were never started and are
    left alone.
    """
    state = Path(state_dir).resolve()
    if not state.exists():
        return
    with _locked(state / ".lock"):
        for name in SERVICES:
            if name in services:
                _stop(state, name, timeout_s)


@contextlib.contextmanager
def running(state_dir: Path | str = DEFAULT_STATE_DIR, **ports: int) -> Iterator[Endpoints]:
    """:func:`up` for the length of a block (``ports``: its port arguments); when the block
    ends, however it ends, :func:`down` the services this call started (those that were running
    before stay up, and so does one the environment names)."""
    before = {name for name, service in status(state_dir).items() if service.running}
    try:
        yield up(state_dir, **ports)  # type: ignore[arg-type]
    finally:
        started = [name for name in SERVICES if name not in before]
        if started:  # a service that failed to start included: up() leaves none half-started
            down(state_dir, services=started)


def status(state_dir: Path | str = DEFAULT_STATE_DIR) -> dict[str, ServiceStatus]:
    """The state of each service of ``state_dir`` (``running`` is False if it was never started)."""
    state = Path(state_dir).resolve()
    out: dict[str, ServiceStatus] = {}
    for name in SERVICES:
        record = _read_record(state, name)
        if record is None:
            out[name] = ServiceStatus(name, False, None, None, None)
        else:
            out[name] = ServiceStatus(name, _belongs(record), record.pid, record.endpoint, Path(record.log_file))
    return out


# ----------------------------------------------------------------------------- CLI

app = typer.Typer(help="Run a local Kafka broker and Redis server (no Docker needed).", no_args_is_help=True)

StateDirOption = Annotated[Path, typer.Option("--state-dir", help="Pid files, logs and data.", file_okay=False)]


@app.command("up")
def up_command(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    kafka_port: Annotated[int, typer.Option(help="Kafka client port.")] = DEFAULT_KAFKA_PORT,
    controller_port: Annotated[
        int | None, typer.Option(help="KRaft controller port (default: 9093, or kafka-port + 1).")
    ] = None,
    redis_port: Annotated[int, typer.Option(help="Redis port.")] = DEFAULT_REDIS_PORT,
    timeout_s: Annotated[float, typer.Option(help="Seconds each service may take to answer.")] = 90.0,
) -> None:
    """Start Kafka and Redis (or reuse running ones) and print `export ...` for `eval`."""
    try:
        endpoints = up(
            state_dir,
            kafka_port=kafka_port,
            controller_port=controller_port,
            redis_port=redis_port,
            timeout_s=timeout_s,
        )
    except InfraError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(endpoints.export_line())


@app.command("down")
def down_command(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Stop the Kafka and Redis processes that `up` started from this state directory."""
    if not state_dir.is_dir():
        typer.echo(f"no services were started from {state_dir}", err=True)
        return
    down(state_dir)
    typer.echo(f"stopped services of {state_dir}", err=True)


@app.command("status")
def status_command(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Show whether the services of this state directory run; exit 1 if any does not."""
    states = status(state_dir)
    for s in states.values():
        if s.running:
            typer.echo(f"{s.name:6} running  pid {s.pid}  {s.endpoint}  log {s.log_file}")
        else:
            typer.echo(f"{s.name:6} stopped" + (f"  (last endpoint {s.endpoint})" if s.endpoint else ""))
    if not all(s.running for s in states.values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    app()
