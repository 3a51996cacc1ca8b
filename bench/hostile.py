#!/usr/bin/env python3
"""Figures for issue 11's probes against the real agent (the tests assert behaviour; this
prints numbers). One JSON line per scenario:

  big_output   a check printing SIZE bytes (default 1.5 GB): the deploy's outcome, the
               agent's peak RSS (VmHWM) before and after, wall time
  background   a check and a migration that leave `setsid sleep 100000 &` behind: outcome
               and deploy time
  flood        1,100 idle control-socket connections, the agent at 1024 descriptors:
               time until the socket answers again, deploy outcome and time meanwhile

usage: bench/hostile.py [--scenario big_output|background|flood|all] [--size BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.ask.control import ControlClient, ControlError, socket_path  # noqa: E402
from controller.mqtt.broker import Mosquitto  # noqa: E402
from controller.state.inventory import render_inventory  # noqa: E402
from controller.state.keys import init_keys  # noqa: E402


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return -1


def system(root: Path, name: str, steps: list[dict[str, object]],
           programs: dict[str, str]) -> Path:
    top = root / name
    (top / "flotilla").mkdir(parents=True)
    for prog, body in programs.items():
        (top / prog).write_text("#!/bin/sh\n" + body)
        (top / prog).chmod(0o755)
    for step in steps:
        for key in ("check",):
            if isinstance(step.get(key), str):
                step[key] = str(top / str(step[key]))
        migrations = step.get("migrations")
        if isinstance(migrations, dict):
            step["migrations"] = {k: str(top / v) for k, v in migrations.items()}
    (top / "flotilla/steps.json").write_text(json.dumps({"steps": steps}))
    return top


class Host:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.broker = Mosquitto(root / "broker")
        self.broker.start()
        _, self.pub = init_keys(root / "ctl")
        (root / "fleet.toml").write_text(render_inventory({"h1": ["all"]}, {}))
        self.env = {**os.environ, "FLEET_BROKER": self.broker.url,
                    "FLEET_INVENTORY": str(root / "fleet.toml"),
                    "FLEET_STATE_DIR": str(root / "ctl")}
        self.state = root / "agents" / "h1"
        self.state.mkdir(parents=True)
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "client", "run", "--host", "h1", "--state-dir",
             str(self.state), "--trust-key", str(self.pub), "--broker", self.broker.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + 60
        while not socket_path(self.state).exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def deploy(self, *args: str) -> tuple[str, float]:
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "controller", "deploy", "h1", *args,
                            "--json", "--timeout", "600"], capture_output=True, text=True,
                           env=self.env, cwd=REPO)
        elapsed = time.monotonic() - start
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        try:
            outcome = json.loads(lines[-1])["hosts"]["h1"]
        except (IndexError, KeyError, ValueError):
            outcome = f"error: {r.stderr.strip()[-200:]}"
        return str(outcome), elapsed

    def close(self) -> None:
        self.agent.terminate()
        self.agent.wait(30)
        self.broker.stop()


def big_output(root: Path, size: int) -> dict[str, object]:
    host = Host(root)
    try:
        top = system(root, "sys-big", [{"name": "big", "check": "check"}],
                     {"check": f"head -c {size} /dev/zero | tr '\\0' y\n"})
        before = hwm_kib(host.agent.pid)
        outcome, elapsed = host.deploy("--system", str(top))
        return {"scenario": "big_output", "printed_bytes": size, "outcome": outcome,
                "agent_peak_rss_mib_before": round(before / 1024, 1),
                "agent_peak_rss_mib_after": round(hwm_kib(host.agent.pid) / 1024, 1),
                "seconds": round(elapsed, 1)}
    finally:
        host.close()


def background(root: Path) -> dict[str, object]:
    host = Host(root)
    try:
        top = system(root, "sys-bg", [{"name": "bg", "check": "check",
                                       "migrations": {"*": "migrate"}}],
                     {"check": "setsid sleep 100000 & echo '{\"items\":[]}'\n",
                      "migrate": "setsid sleep 100000 &\n"})
        outcome, elapsed = host.deploy("--system", str(top))
        return {"scenario": "background", "outcome": outcome, "seconds": round(elapsed, 1)}
    finally:
        host.close()


def flood(root: Path, n: int = 1100) -> dict[str, object]:
    host = Host(root)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1000)), hard))
    _, agent_hard = resource.prlimit(host.agent.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(host.agent.pid, resource.RLIMIT_NOFILE, (1024, agent_hard))
    path = socket_path(host.state)
    conns = []
    try:
        host.deploy("--system", "/nix/store/warm-up")
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))
            try:
                s.connect(str(path))
                conns.append(s)
            except OSError:
                s.close()
        start = time.monotonic()
        while True:
            try:
                ControlClient(path, timeout=2).status()
                break
            except ControlError:
                if time.monotonic() - start > 120:
                    break
        answered = time.monotonic() - start
        outcome, elapsed = host.deploy("--system", "/nix/store/during-flood")
        return {"scenario": "flood", "connections": len(conns),
                "status_answered_after_s": round(answered, 2), "deploy": outcome,
                "deploy_seconds": round(elapsed, 1),
                "agent_descriptors": len(os.listdir(f"/proc/{host.agent.pid}/fd"))}
    finally:
        for s in conns:
            s.close()
        host.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["big_output", "background", "flood", "all"],
                   default="all")
    p.add_argument("--size", type=int, default=1_500_000_000)
    args = p.parse_args()
    for name in ("big_output", "background", "flood"):
        if args.scenario not in (name, "all"):
            continue
        with tempfile.TemporaryDirectory(prefix=f"flotilla-bench-{name}-") as tmp:
            root = Path(tmp)
            row = (big_output(root, args.size) if name == "big_output"
                   else background(root) if name == "background" else flood(root))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
