"""Start Mosquitto from the repository's `mosquitto.conf` (demo, tests, benchmarks).

Only the first listener's port and `persistence_location` are rewritten; everything
else is the configuration a user starts from.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import FlotillaError, InputError

REPO_CONF = Path(__file__).resolve().parents[1] / "mosquitto.conf"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@dataclass
class Mosquitto:
    """A Mosquitto process we own: start, kill -9, restart on the same port and data."""

    workdir: Path
    port: int = field(default_factory=free_port)
    extra: str = ""
    proc: subprocess.Popen[bytes] | None = None

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
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.workdir / "mosquitto.log").read_text()[-500:]
                raise BrokerStartError(f"mosquitto exited at start: {tail.strip()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise BrokerStartError(f"mosquitto did not listen on port {self.port} in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final persistence save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@contextlib.contextmanager
def running_mosquitto(workdir: Path, extra: str = "") -> Iterator[Mosquitto]:
    broker = Mosquitto(workdir, extra=extra)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
