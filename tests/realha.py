"""A real Home Assistant core for the tests: `hass` from its own venv (`.venv-ha`).

Home Assistant 2024.3.3 (the newest for Python 3.11) pins pydantic 1 and paho-mqtt
1.6.1, so it cannot share the suite's venv; `make setup` creates `.venv-ha`. The core
runs as a subprocess with a temporary config dir: its MQTT integration is a config
entry (as the config flow would write it) pointed at the test Mosquitto, and a small
custom integration (`tests/ha_core/flotilla_test`) opens a Unix-socket control channel
through which tests call HA services and read HA's state machine and entity registry.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.mqtt.broker import free_port

REPO = Path(__file__).resolve().parents[1]
HA_VENV = Path(os.environ.get("FLOTILLA_HA_VENV", REPO / ".venv-ha"))
HA_PYTHON = HA_VENV / "bin" / "python"
HA_VERSION = "2024.3.3"
INSTALL_HINT = (f"Home Assistant {HA_VERSION} is not installed in {HA_VENV}: run `make setup`"
                f" (or: python3 -m venv {HA_VENV} && {HA_VENV}/bin/pip install"
                f" homeassistant=={HA_VERSION} paho-mqtt==1.6.1 janus==1.0.0)")
COMPONENT = Path(__file__).resolve().parent / "ha_core" / "flotilla_test"


class HomeAssistantMissing(Exception):
    pass


def ha_installed() -> str | None:
    """None when HA's venv is usable, else why not (with the install command)."""
    if not HA_PYTHON.exists():
        return INSTALL_HINT
    r = subprocess.run([str(HA_PYTHON), "-c", "import homeassistant.const as c, paho.mqtt, janus;"
                        " print(c.__version__)"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or r.stdout.strip() != HA_VERSION:
        return f"{INSTALL_HINT} ({(r.stderr or r.stdout).strip().splitlines()[-1:]})"
    return None


def write_config(root: Path, *, broker_port: int, username: str | None,
                 password: str | None, sock: Path) -> Path:
    """A Home Assistant config dir: core settings, MQTT config entry, control channel."""
    config = root / "config"
    (config / ".storage").mkdir(parents=True, exist_ok=True)
    (config / "custom_components").mkdir(exist_ok=True)
    shutil.copytree(COMPONENT, config / "custom_components" / COMPONENT.name,
                    dirs_exist_ok=True)
    (config / "configuration.yaml").write_text(
        "homeassistant:\n"
        "  name: Flotilla test\n  latitude: 52.5\n  longitude: 13.4\n  elevation: 0\n"
        "  unit_system: metric\n  time_zone: UTC\n  currency: EUR\n  country: DE\n"
        f"http:\n  server_host: 127.0.0.1\n  server_port: {free_port()}\n"
        "logger:\n  default: warning\n  logs:\n"
        "    homeassistant.components.mqtt: debug\n"
        f"flotilla_test:\n  socket: {sock}\n")
    data: dict[str, Any] = {"broker": "127.0.0.1", "port": broker_port, "discovery": True}
    if username is not None:
        data.update(username=username, password=password or "")
    entry = {"entry_id": uuid.uuid4().hex, "version": 1, "minor_version": 1, "domain": "mqtt",
             "title": "127.0.0.1", "data": data, "options": {},
             "pref_disable_new_entities": False, "pref_disable_polling": False,
             "source": "user", "unique_id": None, "disabled_by": None}
    (config / ".storage" / "core.config_entries").write_text(json.dumps(
        {"version": 1, "minor_version": 1, "key": "core.config_entries",
         "data": {"entries": [entry]}}))
    return config


@dataclass
class HomeAssistantCore:
    """One running Home Assistant core and its control channel."""

    root: Path
    broker_port: int
    username: str | None = None
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    sock: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        # AF_UNIX paths are limited to 108 bytes: pytest's tmp dirs can be longer
        self.sock = Path("/tmp") / f"flotilla-ha-{uuid.uuid4().hex[:10]}.sock"
        self.log = self.root / "home-assistant.stderr"

    def start(self, timeout: float = 90) -> HomeAssistantCore:
        why = ha_installed()
        if why is not None:
            raise HomeAssistantMissing(why)
        config = write_config(self.root, broker_port=self.broker_port, username=self.username,
                              password=self.password, sock=self.sock)
        self.proc = subprocess.Popen(
            [str(HA_PYTHON), "-m", "homeassistant", "--config", str(config), "--skip-pip",
             "--log-no-color", "--ignore-os-check"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),  # noqa: SIM115
            start_new_session=True)
        try:
            self.wait_for(self._ready, timeout, "Home Assistant to start and connect to the"
                          " broker")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Home Assistant exited ({self.proc.returncode}): "
                                 f"{self.log_tail()}")
        if not self.sock.exists():
            return False
        try:
            return bool(self.request({"op": "ready"}).get("mqtt"))
        except OSError:
            return False

    def log_tail(self, n: int = 3000) -> str:
        text = ""
        for path in (self.log, self.root / "config" / "home-assistant.log"):
            if path.exists():
                text += path.read_text(errors="replace")[-n:]
        return text

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # A test core holds nothing worth a graceful stop (HA waits up to 30 s for
        # non-daemonic threads): SIGTERM, a short grace, then SIGKILL.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.sock.unlink(missing_ok=True)

    # -- the control channel -----------------------------------------------------------
    def request(self, req: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.sock))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise OSError("Home Assistant closed the control channel")
                buf += chunk
        out: dict[str, Any] = json.loads(buf)
        return out

    def states(self) -> dict[str, dict[str, Any]]:
        out = self.request({"op": "states"})
        assert out["ok"], out
        return {s["entity_id"]: s for s in out["states"]}

    def state(self, entity_id: str) -> dict[str, Any] | None:
        return self.states().get(entity_id)

    def entity_id(self, domain: str, unique_id: str, timeout: float = 30) -> str:
        """The entity id HA gave the entity with this unique id (discovered by now)."""
        def found() -> str | None:
            out = self.request({"op": "entity_id", "domain": domain, "unique_id": unique_id})
            assert out["ok"], out
            return out["entity_id"]  # type: ignore[no-any-return]
        result: str = self.wait_for(found, timeout, f"HA to discover {domain} {unique_id}")
        return result

    def call(self, domain: str, service: str, **data: Any) -> dict[str, Any]:
        """Call an HA service (blocking until HA has handled it); the channel's reply."""
        return self.request({"op": "call", "domain": domain, "service": service,
                             "data": data})

    def wait_state(self, entity_id: str, pred: Callable[[dict[str, Any]], bool],
                   timeout: float = 30, what: str = "") -> dict[str, Any]:
        last: list[dict[str, Any] | None] = [None]

        def ok() -> dict[str, Any] | None:
            st = self.state(entity_id)
            last[0] = st
            return st if st is not None and pred(st) else None
        try:
            result: dict[str, Any] = self.wait_for(ok, timeout, what or f"{entity_id} state")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last state of {entity_id}: {last[0]}") from None
        return result

    def wait_for(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
