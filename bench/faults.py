#!/usr/bin/env python3
"""Figures for the fault-injection scenarios of issue 7 (the tests assert behaviour; this
prints numbers). One JSON line per scenario:

  broker_kill  N simulated hosts mid-rollout, Mosquitto SIGKILLed and restarted:
               results that reached the controller, lost results, rollout time
  flood        a rollout of 5 hosts while another host floods 10,000 progress events:
               rollout time with and without the flood, flood rate

usage: bench/faults.py [--hosts N] [--scenario broker_kill|flood|all]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiomqtt  # noqa: E402

from controller.mqtt.broker import Mosquitto  # noqa: E402
from controller.state.inventory import render_inventory  # noqa: E402
from controller.state.keys import init_keys  # noqa: E402
from protocol.broker import BrokerCluster  # noqa: E402
from protocol.codec import encode  # noqa: E402
from protocol.models import Progress  # noqa: E402
from protocol.topics import Topics  # noqa: E402


class Setup:
    def __init__(self, root: Path, hosts: list[str]) -> None:
        self.root = root
        self.broker = Mosquitto(root / "broker")
        self.broker.start()
        _, self.pub = init_keys(root / "ctl")
        (root / "fleet.toml").write_text(render_inventory(
            {h: ["noise" if h == "noisy" else "all"] for h in hosts}, {}))
        self.env = {**os.environ, "FLEET_BROKER": self.broker.url,
                    "FLEET_INVENTORY": str(root / "fleet.toml"),
                    "FLEET_STATE_DIR": str(root / "ctl")}
        self.procs: list[subprocess.Popen[bytes]] = []

    def agents(self, hosts: list[str], *extra: str) -> None:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "client", "simulate", "--hosts", ",".join(hosts),
             "--state-dir", str(self.root / "agents"), "--trust-key", str(self.pub),
             "--broker", self.broker.url, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO))

    def deploy(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "controller", "deploy", *args, "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=REPO)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()
        self.broker.stop()


def summary(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=600)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"deploy printed nothing: {err.strip()}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


def broker_kill(n: int) -> dict[str, object]:
    hosts = [f"h{i:04d}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(Path(tmp), hosts)
        try:
            s.agents(hosts, "--sim-fetch-delay", "1.0", "--sim-switch-delay", "1.5")
            time.sleep(2.0)
            started = time.monotonic()
            proc = s.deploy("@all", "--system", "/nix/store/bench", "--timeout", "300")
            time.sleep(2.0)
            s.broker.kill()
            down = time.monotonic()
            time.sleep(1.0)
            s.broker.start()
            downtime = time.monotonic() - down
            out = summary(proc)
            elapsed = time.monotonic() - started
        finally:
            s.close()
    hosts_out = out["hosts"]
    assert isinstance(hosts_out, dict)
    reached = sum(1 for v in hosts_out.values() if v is not None and v != "timed_out")
    return {"scenario": "broker_kill", "hosts": n, "results": reached, "lost": n - reached,
            "succeeded": out["succeeded"], "broker_down_s": round(downtime, 2),
            "rollout_s": round(elapsed, 2)}


async def _flood(url: str, events: int) -> float:
    topic = Topics().events("noisy")
    broker = BrokerCluster.parse(url)
    started = time.monotonic()
    async with aiomqtt.Client(**broker.client_kwargs(broker.addresses[0], "bench-flood"),
                              max_inflight_messages=1000) as client:
        for i in range(events):
            ev = Progress(host="noisy", deployment_id="flood", generation=1, seq=i,
                          time=time.time(), stage="fetch", message="x" * 50)
            await client.publish(topic, encode(ev), qos=0)
    return time.monotonic() - started


def flood(events: int = 10_000) -> dict[str, object]:
    hosts = [f"n{i}" for i in range(5)]
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(Path(tmp), [*hosts, "noisy"])
        try:
            s.agents(hosts, "--sim-fetch-delay", "1.0")
            time.sleep(2.0)
            t0 = time.monotonic()
            base = summary(s.deploy("@all", "--system", "/nix/store/base"))
            baseline = time.monotonic() - t0
            t0 = time.monotonic()
            proc = s.deploy("@all", "--system", "/nix/store/flooded")
            flood_s = asyncio.run(_flood(s.broker.url, events))
            out = summary(proc)
            flooded = time.monotonic() - t0
        finally:
            s.close()
    return {"scenario": "flood", "events": events, "flood_rate_per_s": round(events / flood_s),
            "baseline_s": round(baseline, 2), "rollout_s": round(flooded, 2),
            "succeeded": out["succeeded"], "baseline_succeeded": base["succeeded"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--scenario", choices=["broker_kill", "flood", "all"], default="all")
    args = ap.parse_args()
    if args.scenario in ("broker_kill", "all"):
        print(json.dumps(broker_kill(args.hosts)), flush=True)
    if args.scenario in ("flood", "all"):
        print(json.dumps(flood()), flush=True)


if __name__ == "__main__":
    main()
