"""Start the brokers Flotilla is tested against (demo, tests, benchmarks).

- Mosquitto from the repository's `mosquitto.conf`: only the first listener's port and
  `persistence_location` are rewritten; everything else is the configuration a user
  starts from.
- NATS (`nats-server` 2.9+, its MQTT gateway on JetStream), one node or a cluster on
  loopback, from `render_nats_config`: the configuration the README shows.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import FlotillaError, InputError

REPO_CONF = Path(__file__).resolve().parents[2] / "mosquitto.conf"


class BrokerStartError(FlotillaError):
    pass


def find_config() -> Path:
    env = os.environ.get("FLEET_MOSQUITTO_CONF")
    path = Path(env) if env else REPO_CONF
    if not path.exists():
        raise InputError(f"mosquitto.conf not found at {path} (set FLEET_MOSQUITTO_CONF)")
    return path


def render_config(text: str, port: int, data_dir: Path, extra: str = "") -> str:
    """The user's config with the first listener's port and the persistence dir replaced."""
    out: list[str] = []
    listener_done = False
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["listener"] and not listener_done:
            addr = words[2] if len(words) > 2 else "127.0.0.1"
            line = f"listener {port} {addr}"
            listener_done = True
        elif words[:1] == ["persistence_location"]:
            line = f"persistence_location {data_dir}/"
        elif words[:1] in (["pid_file"], ["log_dest"]):
            continue
        out.append(line)
    if not listener_done:
        raise InputError("mosquitto.conf has no listener line")
    # Started as root, Mosquitto drops to user `mosquitto`, which cannot write a private
    # temp dir: persistence would fail silently. Our own brokers keep our user.
    as_root = "user root\n" if os.geteuid() == 0 else ""
    return "\n".join(out) + "\nlog_dest stderr\n" + as_root + extra


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port that is free now, for a server we are about to start.

    It is taken below the kernel's ephemeral range: a port the kernel hands out for
    `bind(0)` is also what it picks as the local port of outgoing connections, so any
    client connecting meanwhile may take it before the server binds ("Address already in
    use"). Ports are not handed out twice by one process (a caller that asks for several
    before starting anything would otherwise get the same one back)."""
    low, high = _ephemeral_range()
    start, stop = (10000, low) if low - 10000 >= 4096 else (high + 1, 65536)
    for _ in range(1000):
        port = random.randrange(start, stop)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free loopback port found outside the ephemeral range")


def mosquitto_binary() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def die_with_parent(argv: list[str]) -> list[str]:
    """`argv` run so that it gets SIGTERM when the process starting it dies, even by
    SIGKILL when nothing can clean up (Linux's parent-death signal, set by util-linux's
    setpriv, which is essential on Debian; without it `argv` as it is). Start it from
    the main thread: the signal follows the thread that forked."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *argv] if setpriv else argv


class OwnedProcess:
    """A broker process we own: kill -9 (no clean shutdown, no final persistence save), or
    stop (SIGTERM, then SIGKILL after STOP_TIMEOUT seconds)."""

    STOP_TIMEOUT = 5.0
    proc: subprocess.Popen[bytes] | None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@dataclass
class Mosquitto(OwnedProcess):
    """A Mosquitto process we own: start, kill -9, restart on the same port and data."""

    workdir: Path
    port: int = field(default_factory=free_port)
    extra: str = ""
    proc: subprocess.Popen[bytes] | None = None
    owned_for_life: bool = False
    """Dies with the process that started it (`die_with_parent`), as the demo's does."""

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerStartError(
                "mosquitto is not installed: run 'sudo apt-get install mosquitto'")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(render_config(find_config().read_text(), self.port, data, self.extra))
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - lives with proc
        argv = [binary, "-c", str(conf)]
        self.proc = subprocess.Popen(die_with_parent(argv) if self.owned_for_life else argv,
                                     stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.workdir / "mosquitto.log").read_text()[-500:]
                raise BrokerStartError(f"mosquitto exited at start: {tail.strip()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        self.kill()  # never left running behind the error
        raise BrokerStartError(f"mosquitto did not listen on port {self.port} in {timeout}s")



@contextlib.contextmanager
def running_mosquitto(workdir: Path, extra: str = "") -> Iterator[Mosquitto]:
    """A Mosquitto for the life of this process (the demo's): stopped on the way out,
    and by the kernel if we are killed."""
    broker = Mosquitto(workdir, extra=extra, owned_for_life=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# -- NATS ------------------------------------------------------------------------------
NATS_INSTALL = "sudo apt-get install nats-server"


@dataclass(frozen=True)
class NatsNodeConfig:
    """One node of a NATS cluster serving MQTT (JetStream keeps sessions and retained
    messages, replicated across the cluster). `routes` are the other nodes' cluster
    listeners (host:port); none for a single node."""

    name: str
    store_dir: Path
    host: str = "127.0.0.1"
    client_port: int = 4222
    mqtt_port: int = 1883
    cluster_port: int = 6222
    routes: tuple[str, ...] = ()
    cluster_name: str = "flotilla"
    extra: str = ""


def render_nats_config(node: NatsNodeConfig) -> str:
    """nats-server configuration for one node. What each line is for:
    - `server_name`: JetStream needs a name per node (unique in the cluster);
    - `jetstream.store_dir`: where the MQTT sessions and retained messages live;
    - `mqtt`: the MQTT 3.1.1 listener (clients need `--mqtt-version 3.1.1`);
      `stream_replicas`: keep sessions, retained and QoS 1 messages on every node of a
      3-node cluster, so one node may restart without losing any;
      `consumer_replicas: 1`: every QoS 1 subscription of every session is a durable
      JetStream consumer; replicated, each is a RAFT group of its own (3 per agent), and
      at 100 agents starting at once creating them timed out (4 s), which NATS answers
      with a refused SUBSCRIBE. One copy (on disk, on one node) is what MQTT needs: the
      messages themselves stay replicated in the stream;
    - `cluster`: the routes between nodes."""
    clustered = bool(node.routes)
    replicas = min(3, len(node.routes) + 1)
    lines = [
        f"server_name: {node.name}",
        f"listen: {node.host}:{node.client_port}",
        "jetstream {",
        f'  store_dir: "{node.store_dir}"',
        "}",
        "mqtt {",
        f"  listen: {node.host}:{node.mqtt_port}",
    ]
    if clustered:
        lines += [f"  stream_replicas: {replicas}", "  consumer_replicas: 1"]
    lines.append("}")
    if clustered:
        lines += [
            "cluster {",
            f"  name: {node.cluster_name}",
            f"  listen: {node.host}:{node.cluster_port}",
            "  routes: [",
            *(f"    nats-route://{r}" for r in node.routes),
            "  ]",
            "}",
        ]
    return "\n".join(lines) + "\n" + node.extra


def nats_binary() -> str | None:
    for candidate in (shutil.which("nats-server"), "/usr/sbin/nats-server",
                      "/usr/bin/nats-server"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def mqtt_connack(host: str, port: int, timeout: float = 1.0) -> int | None:
    """CONNACK return code of a plain MQTT 3.1.1 CONNECT (clean session), or None if
    the port does not answer with one. Used to wait until a broker really serves MQTT
    (a NATS node listens before its JetStream is ready)."""
    client_id = f"flotilla-probe-{os.getpid()}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(bytes([0x10, len(body)]) + body)
            reply = s.recv(4)
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")
    except OSError:
        return None
    if len(reply) < 4 or reply[0] != 0x20:
        return None
    return reply[3]


@dataclass
class NatsNode(OwnedProcess):
    """A nats-server process we own: start, stop, kill -9, restart on the same ports and
    store dir."""

    STOP_TIMEOUT = 10.0

    workdir: Path
    config: NatsNodeConfig
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.config.mqtt_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.config.name}.log"

    def launch(self) -> None:
        binary = nats_binary()
        if binary is None:
            raise BrokerStartError(f"nats-server is not installed: run '{NATS_INSTALL}'")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"{self.config.name}.conf"
        conf.write_text(render_nats_config(self.config))
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with proc
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log,
                                     start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log_path.read_text()[-800:] if self.log_path.exists() else ""
                raise BrokerStartError(f"nats-server {self.config.name} exited: "
                                       f"{tail.strip()}")
            if mqtt_connack("127.0.0.1", self.config.mqtt_port) == 0:
                return
            time.sleep(0.1)
        raise BrokerStartError(f"nats-server {self.config.name} did not serve MQTT on port "
                               f"{self.config.mqtt_port} in time (see {self.log_path})")

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        try:
            self.wait_ready(time.monotonic() + timeout)
        except BrokerStartError:
            self.kill()  # never left running behind the error
            raise



@dataclass
class NatsCluster:
    """`size` NATS nodes on loopback (free ports), routed to each other, JetStream
    replicated; size 1 is a single node. `url` lists every node (the comma-separated
    form `--broker` takes); `nodes[i].url` is one node."""

    workdir: Path
    size: int = 3
    nodes: list[NatsNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = [(free_port(), free_port(), free_port()) for _ in range(self.size)]
        for i, (client, mqtt, cluster) in enumerate(ports):
            routes = tuple(f"127.0.0.1:{p[2]}" for j, p in enumerate(ports) if j != i)
            name = f"nats{i + 1}"
            cfg = NatsNodeConfig(name=name, store_dir=self.workdir / name / "jetstream",
                                 client_port=client, mqtt_port=mqtt, cluster_port=cluster,
                                 routes=routes)
            self.nodes.append(NatsNode(self.workdir / name, cfg))

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout: float = 60.0) -> None:
        for n in self.nodes:  # all at once: a clustered node waits for its peers
            n.launch()
        deadline = time.monotonic() + timeout
        try:
            for n in self.nodes:
                n.wait_ready(deadline)
        except BrokerStartError:
            self.stop()
            raise

    def restart(self, index: int, kill: bool = False, timeout: float = 60.0) -> None:
        """Stop one node (SIGTERM, or SIGKILL with `kill`) and start it again on the same
        ports and store dir; returns once it serves MQTT again."""
        node = self.nodes[index]
        node.kill() if kill else node.stop()
        node.start(timeout)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@contextlib.contextmanager
def running_nats(workdir: Path, size: int = 3) -> Iterator[NatsCluster]:
    """A NATS cluster of `size` nodes (1: a single node) for the block."""
    cluster = NatsCluster(workdir, size)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
