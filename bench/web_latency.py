#!/usr/bin/env python3
"""The web dashboard's update latency: from an MQTT message to the change in the page's
DOM, in a real headless Chromium (Debian's /usr/bin/chromium via Playwright).

A real Mosquitto, N simulated agents and `fleetctl serve` run locally; the browser
shows the fleet page. For each of --samples rounds the script publishes a retained
HostState for one host (a new message text) and takes the time just before the
publish; a MutationObserver in the page takes the time (Date.now(), same machine clock)
when that host's row shows the text. Then, with --screenshot PATH, a 50-host rollout is
started from the CLI and the fleet page is saved mid-rollout.

Prints one JSON line: {hosts, samples, latency_ms: {median, p90, max, min}}.

usage: bench/web_latency.py [--hosts 50] [--samples 40] [--screenshot docs/x.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402

from controller.mqtt.broker import Mosquitto, free_port  # noqa: E402
from controller.state.inventory import render_inventory  # noqa: E402
from controller.state.keys import init_keys  # noqa: E402
from protocol.broker import parse_broker_url  # noqa: E402
from protocol.codec import encode  # noqa: E402
from protocol.models import HostState  # noqa: E402
from protocol.topics import Topics  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
OBSERVER = """() => {
  window.__seen = {};
  new MutationObserver(() => {
    const now = Date.now();
    for (const td of document.querySelectorAll('#hosts td.message')) {
      const m = td.textContent.match(/latency-probe-(\\d+)/);
      if (m && !(m[1] in window.__seen)) window.__seen[m[1]] = now;
    }
  }).observe(document.getElementById('hosts'), {childList: true, subtree: true,
                                                  characterData: true});
}"""


def probe(broker_url: str, topics: Topics, hosts: list[str], page: Any,
          samples: int) -> list[float]:
    """Publish with paho's own network thread (Playwright's sync API owns this thread's
    event loop); poll the page for the time its observer saw each probe."""
    address = parse_broker_url(broker_url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(address.host, address.port)
    client.loop_start()
    out = []
    try:
        for i in range(samples):
            host = hosts[i % len(hosts)]
            payload = encode(HostState(host=host, message=f"latency-probe-{i}",
                                       updated_at=time.time()))
            sent_ms = time.time() * 1000
            client.publish(topics.state(host), payload, qos=1, retain=True)
            deadline = time.monotonic() + 10
            seen = None
            while seen is None and time.monotonic() < deadline:
                time.sleep(0.02)
                seen = page.evaluate(f"window.__seen['{i}'] || null")
            if seen is None:
                raise SystemExit(f"probe {i} never reached the page")
            out.append(float(seen) - sent_ms)
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--screenshot", type=Path)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="flotilla-web-bench-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "broker")
        broker.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            state = root / "controller"
            _, pub = init_keys(state)
            roles = ("web", "db", "cache")
            names = [f"node-{i:02d}" for i in range(1, args.hosts + 1)]
            inv = root / "fleet.toml"
            inv.write_text(render_inventory({n: ["demo", roles[i % 3]]
                                             for i, n in enumerate(names)}, {}))
            env = {**os.environ, "FLEET_BROKER": broker.url, "FLEET_INVENTORY": str(inv),
                   "FLEET_STATE_DIR": str(state)}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "client", "simulate", "--hosts", ",".join(names),
                 "--broker", broker.url, "--state-dir", str(root / "agents"),
                 "--trust-key", str(pub), "--sim-fetch-delay", "1.0", "--sim-switch-delay",
                 "1.5", "--sim-fail-rate", "0.06", "--sim-seed", "screenshot"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            port = free_port()
            serve = subprocess.Popen(
                [sys.executable, "-m", "controller", "serve", "--listen", f"127.0.0.1:{port}",
                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
            procs.append(serve)  # type: ignore[arg-type]
            assert serve.stdout is not None
            if not serve.stdout.readline():
                raise SystemExit("fleetctl serve did not start")
            url = f"http://127.0.0.1:{port}/"
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = b.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(url)
                page.wait_for_selector("#live[data-state=live]")
                page.wait_for_function(
                    f"() => document.querySelectorAll('#hosts .dot.on').length === {len(names)}",
                    timeout=60000)
                page.evaluate(OBSERVER)
                lat = probe(broker.url, Topics(), names, page, args.samples)
                if args.screenshot:
                    deploy = subprocess.Popen(
                        [sys.executable, "-m", "controller", "deploy", "@demo", "--system",
                         "/nix/store/7g2kq0m5pd9x3vnc1hzr8l4wfb6yjas0-nixos-system-25.11",
                         "--batch", "10", "--json"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, env=env)
                    procs.append(deploy)  # type: ignore[arg-type]
                    page.goto(url + "?sort=phase")  # hosts in flight first
                    page.wait_for_function(
                        "() => document.querySelectorAll('#hosts tr[data-phase=succeeded]')"
                        ".length >= 18 && [...document.querySelectorAll('#hosts tr')].some("
                        "r => r.dataset.phase === 'rolled_back')", timeout=120000)
                    page.screenshot(path=str(args.screenshot))
                    deploy.wait(timeout=180)
                b.close()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=10)
            broker.stop()
    lat.sort()
    print(json.dumps({"hosts": args.hosts, "samples": len(lat), "latency_ms": {
        "median": round(statistics.median(lat), 1),
        "p90": round(lat[int(0.9 * (len(lat) - 1))], 1),
        "min": round(lat[0], 1), "max": round(lat[-1], 1)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
