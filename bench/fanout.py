"""Fan-out benchmark: Flotilla's deploy against the raw MQTT floor, in one run.

    python bench/fanout.py N                  # floor + Flotilla deploy to N hosts
    python bench/fanout.py N --flotilla-only  # no floor (floor_s and ratios null)
    python bench/fanout.py N --rollout        # + full rollout: batches of 10 %, max-failures 5 %
    python bench/fanout.py 5000 --rss         # controller peak RSS (Flotilla only)

Each phase gets a fresh Mosquitto started from the repository's mosquitto.conf. The
agents run in separate processes (`--per-proc` agents each), the measuring controller in
a process of its own, so its peak RSS (`ru_maxrss`) and CPU time are its own. Timing
starts only once every agent is connected and subscribed (its retained `online` is
seen). The last line on stdout is one JSON object; see bench/README.md for the keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiomqtt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from protocol.broker import BrokerCluster  # noqa: E402
from protocol.mqtt import MqttVersion  # noqa: E402

PREFIX = "fleet/v1"
SYSTEM = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-bench-25.11"
PUBLISH_CONCURRENCY = 256  # the same bound as controller.rollout.driver uses
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    """Child → orchestrator marker (one JSON object a line on stdout)."""
    print(json.dumps(obj), flush=True)


def host_names(n: int) -> list[str]:
    return [f"h{i:05d}" for i in range(n)]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; children (broker, agents) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# 3.1.1 for NATS: the orchestrator sets FLEET_MQTT_VERSION for each phase's processes.
MQTT_VERSION: MqttVersion = "3.1.1" if os.environ.get("FLEET_MQTT_VERSION") == "3.1.1" else "5"


def make_client(url: str, identifier: str, version: MqttVersion = MQTT_VERSION
                ) -> aiomqtt.Client:
    broker = BrokerCluster.parse(url, version)
    client = aiomqtt.Client(**broker.client_kwargs(broker.addresses[0], identifier),
                            timeout=30, max_inflight_messages=1000)
    client.pending_calls_threshold = 1_000_000
    return client


async def wait_online(url: str, hosts: list[str], timeout: float) -> float:
    """Until every host's retained `online` reads b"online"; returns the seconds waited."""
    want, seen = set(hosts), set()
    started = time.monotonic()
    last_note = started
    async with make_client(url, f"bench-online-{os.getpid()}") as client:
        await client.subscribe(f"{PREFIX}/host/+/online", qos=1)

        async def collect() -> None:
            nonlocal last_note
            async for m in client.messages:
                host = str(m.topic).split("/")[-2]
                if host in want:
                    if m.payload == b"online":
                        seen.add(host)
                    else:
                        seen.discard(host)
                if len(seen) == len(want):
                    return
                if time.monotonic() - last_note > 10:
                    last_note = time.monotonic()
                    log(f"{len(seen)}/{len(want)} agents online")

        try:
            await asyncio.wait_for(collect(), timeout)
        except TimeoutError:
            raise SystemExit(f"only {len(seen)}/{len(want)} agents came online "
                             f"in {timeout:.0f}s") from None
    return time.monotonic() - started


# The floors, each a phase of bare agents (bench/floor_agents.py --protocol P): "floor"
# acks each message; "protocol" sends a quick Flotilla deploy's packets; "lean" (only
# with --lean-floor) sends two retained states, a protocol Flotilla does not speak.
FLOORS = {"floor": "floor", "protocol": "flotilla", "lean": "lean"}


# -- child: the floor's controller ------------------------------------------------------
async def floor_controller(cfg: dict[str, Any]) -> None:
    """`rounds` fan-outs on the same connections; the floor is their median. With the
    protocol floor's agents a host is acked at its Ack and done at its Result."""
    hosts: list[str] = cfg["hosts"]
    protocol = cfg.get("protocol") in ("flotilla", "lean")
    # the lean protocol reports in the retained state, Flotilla and the floor in events
    leaf = "state" if cfg.get("protocol") == "lean" else "events"
    startup = await wait_online(cfg["url"], hosts, cfg["timeout"])
    acked: set[str] = set()
    done: set[str] = set()
    all_acked, all_done = asyncio.Event(), asyncio.Event()
    async with make_client(cfg["url"], "bench-floor-controller") as client:
        await client.subscribe(f"{PREFIX}/host/+/{leaf}", qos=1)

        async def collect() -> None:
            async for m in client.messages:
                if m.retain:
                    continue  # a state from before this round
                host = str(m.topic).split("/")[-2]
                kind = bytes(m.payload)[:1] if isinstance(m.payload, bytes) else b""
                if not protocol or kind == b"A":
                    acked.add(host)
                    if len(acked) == len(hosts):
                        all_acked.set()
                if not protocol or kind == b"R":
                    done.add(host)
                    if len(done) == len(hosts):
                        all_done.set()

        reader = asyncio.create_task(collect())
        emit({"ev": "ready", "startup_s": startup, "rss_mb": rss_mb()})
        cpu0 = cpu_self()
        emit({"ev": "t0"})
        sem = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        rounds: list[float] = []
        acked_s: list[float] = []
        publish_s: list[float] = []
        for _ in range(cfg["floor_rounds"]):
            for s in (acked, done):
                s.clear()
            all_acked.clear()
            all_done.clear()
            payload = os.urandom(cfg["payload_size"])
            t0 = time.monotonic()

            async def publish(h: str, payload: bytes = payload) -> None:
                async with sem:
                    await client.publish(f"{PREFIX}/host/{h}/desired", payload, qos=1,
                                         retain=True)

            await asyncio.gather(*(publish(h) for h in hosts))
            publish_s.append(time.monotonic() - t0)
            await asyncio.wait_for(all_acked.wait(), cfg["timeout"])
            acked_s.append(time.monotonic() - t0)
            await asyncio.wait_for(all_done.wait(), cfg["timeout"])
            rounds.append(time.monotonic() - t0)
        emit({"ev": "end"})
        reader.cancel()
    emit({"ev": "result", "floor_s": statistics.median(rounds),
          "acked_s": statistics.median(acked_s),
          "rounds_s": [round(r, 3) for r in rounds],
          "publish_s": round(statistics.median(publish_s), 3),
          "controller_cpu_s": cpu_self() - cpu0, "controller_rss_mb": rss_mb()})


# -- child: Flotilla's controller (the real RolloutDriver) --------------------------------
async def flotilla_controller(cfg: dict[str, Any]) -> None:
    from controller.rollout.driver import ControllerContext, DeployRequest, RolloutDriver
    from controller.rollout.planner import RolloutPolicy
    from controller.state.keys import load_key
    from protocol.topics import Topics

    hosts: list[str] = cfg["hosts"]
    n = len(hosts)
    startup = await wait_online(cfg["url"], hosts, cfg["timeout"])
    state_dir = Path(cfg["state_dir"])
    ctx = ControllerContext(broker=BrokerCluster.parse(cfg["url"], MQTT_VERSION),
                            topics=Topics(PREFIX),
                            state_dir=state_dir, key=load_key(state_dir))
    policy = (RolloutPolicy(batch="10%", max_failures="5%") if cfg["rollout"]
              else RolloutPolicy())
    req = DeployRequest(selector="@bench", hosts=hosts, system=SYSTEM,
                        timeout=cfg["timeout"], rollout=policy)
    driver = RolloutDriver(ctx, req)
    base_rss = rss_mb()
    emit({"ev": "ready", "startup_s": startup, "rss_mb": base_rss})

    marks: dict[str, float] = {}
    acked: dict[str, float] = {}
    done: dict[str, float] = {}
    kinds: dict[str, int] = {}
    original_on_message = driver._on_message
    client_publish = aiomqtt.Client.publish
    puback: list[float] = []  # seconds from publish() to its PUBACK, per Desired

    async def publish(self: aiomqtt.Client, topic: str, *args: Any, **kwargs: Any) -> None:
        """Below the driver: t0 is the first Desired handed to the MQTT client."""
        desired = topic.endswith("/desired")
        if desired and "t0" not in marks:
            marks["t0"] = time.monotonic()
            marks["t0_wall"] = time.time()
            marks["cpu0"] = cpu_self()
            emit({"ev": "t0"})
        started = time.monotonic()
        await client_publish(self, topic, *args, **kwargs)
        if desired:
            marks["last_publish"] = time.monotonic()
            puback.append(marks["last_publish"] - started)

    timeline: dict[float, dict[str, int]] = {}

    def on_message(message: aiomqtt.Message) -> None:
        original_on_message(message)
        parts = str(message.topic).split("/")
        if cfg["timeline"] and "t0" in marks and isinstance(message.payload, bytes):
            import msgpack
            with contextlib.suppress(Exception):
                env = msgpack.unpackb(message.payload)
                body = env["body"]
                label = env["type"] + ":" + str(body.get("stage") or body.get("phase") or "")
                slot = timeline.setdefault(round((time.monotonic() - marks["t0"]) * 2) / 2, {})
                slot[label] = slot.get(label, 0) + 1
        kind = parts[-1] if parts[-1] in ("events", "state", "online") else "other"
        kinds[kind] = kinds.get(kind, 0) + 1
        view = driver.views.get(parts[-2])
        if view is None or view.deployment_id is None:
            return
        # Ack is the first event of a deployment: any folded event means it was acked.
        if (view.last_seq >= 0 or view.done) and view.host not in acked:
            acked[view.host] = time.monotonic()
            if len(acked) == n:
                marks["acked"] = time.monotonic()
        if view.done and view.host not in done:
            done[view.host] = time.monotonic()
            if len(done) == n:
                marks["done"] = time.monotonic()

    aiomqtt.Client.publish = publish  # type: ignore[assignment, method-assign]
    driver._on_message = on_message  # type: ignore[method-assign]
    rss_series: list[tuple[float, float, int]] = []

    async def sample_rss() -> None:
        """(seconds since t0, RSS MB, messages received but not yet handled)."""
        while True:
            client = driver._client
            backlog = len(client.messages) if client is not None else 0
            rss_series.append((round(time.monotonic() - marks.get("t0", t_run), 2),
                               round(current_rss_mb(), 1), backlog))
            await asyncio.sleep(0.5)

    t_run = time.monotonic()
    sampler = asyncio.create_task(sample_rss())
    outcome = await driver.run(wait=True)
    sampler.cancel()
    t_end = time.monotonic()
    emit({"ev": "end"})
    t0 = marks.get("t0", t_run)

    def since_t0(key: str) -> float | None:
        return marks[key] - t0 if key in marks else None

    emit({"ev": "result", "acked_s": since_t0("acked"), "done_s": since_t0("done"),
          "rollout_s": t_end - t0, "setup_s": t0 - t_run,
          "publish_s": since_t0("last_publish"),
          "desired_puback_s": percentiles(puback, 0.0),
          "acked_pct": percentiles(acked.values(), t0),
          "done_pct": percentiles(done.values(), t0), "status": outcome.status,
          "counts": outcome.counts(),
          "backlog_max": max((b for _, _, b in rss_series), default=0),
          **({"timeline": timeline, "rss_series": rss_series} if cfg["timeline"] else {}),
          "batches": len(driver.batches),
          "batch_done_s": [round(t - marks.get("t0_wall", 0.0), 2) for _, t in
                           sorted(getattr(driver.progress, "batch_done_at", {}).items())],
          "messages_in": kinds, "messages_in_per_host": round(sum(kinds.values()) / n, 2),
          "controller_cpu_s": cpu_self() - marks.get("cpu0", 0.0),
          "controller_rss_mb": rss_mb(), "controller_rss_base_mb": base_rss})


def percentiles(times: Any, t0: float) -> dict[str, float]:
    """p10/p50/p90/p99 of arrival times after t0: a steady stream or a long tail?"""
    xs = sorted(t - t0 for t in times)
    if not xs:
        return {}
    return {f"p{q}": round(xs[min(len(xs) - 1, int(len(xs) * q / 100))], 3)
            for q in (10, 50, 90, 99)}


def child_main(cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if cfg["kind"] in FLOORS:
        asyncio.run(floor_controller(cfg))
    else:
        asyncio.run(flotilla_controller(cfg))
    return 0


# -- orchestrator -----------------------------------------------------------------------
def proc_cpu(pid: int, system_only: bool = False) -> float:
    """CPU seconds of a process (user + system, or system only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[12]) + (0 if system_only else int(fields[11]))) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (user+nice+system+irq+softirq+steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def desired_size() -> int:
    """Bytes of a real signed Desired, so the floor carries the same payload size."""
    from protocol.codec import encode
    from protocol.models import Desired
    from protocol.signing import generate_key, sign
    d = Desired(host="h00000", deployment_id="r20250101-000000-abcdef",
                rollout_id="r20250101-000000-abcdef", generation=1, system=SYSTEM,
                issued_at=time.time())
    return len(encode(sign(d, generate_key())))


class Phase:
    """One measured phase: broker, agent processes, controller process; all ours."""

    def __init__(self, kind: str, args: argparse.Namespace, work: Path) -> None:
        self.kind, self.args = kind, args
        self.dir = work / kind
        self.dir.mkdir(parents=True)
        self.hosts = host_names(args.n)
        self.agents: list[subprocess.Popen[bytes]] = []
        self.spies: list[subprocess.Popen[bytes]] = []
        self.controller: subprocess.Popen[str] | None = None
        self.broker: Any = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        # NATS serves MQTT 3.1.1 only; every client of the phase (agents, controller,
        # floor) reads FLEET_MQTT_VERSION.
        self.mqtt_version = "3.1.1" if args.broker == "nats-cluster" else "5"

    def chunks(self) -> list[list[str]]:
        """Round-robin, so that every rollout batch (a contiguous slice of the host list)
        is spread over all agent processes, as hosts would be over machines."""
        procs = math.ceil(len(self.hosts) / max(1, self.args.per_proc))
        return [self.hosts[i::procs] for i in range(procs)]

    def start(self) -> None:
        from controller.mqtt.broker import Mosquitto, NatsCluster
        if self.args.broker == "nats-cluster":
            # Agents on nodes 2 and 3, the controller on node 1: every message crosses
            # the cluster, as with agents and fleetctl on different nodes.
            self.broker = NatsCluster(self.dir / "broker", 3)
            urls = [n.url for n in self.broker.nodes]
            controller_url, agent_urls = urls[0], urls[1:]
        else:
            self.broker = Mosquitto(self.dir / "broker",
                                    extra="".join(f"{line}\n" for line in self.args.broker_conf))
            controller_url = self.broker.url
            agent_urls = [controller_url]
        self.broker.start()
        cfg: dict[str, Any] = {"kind": self.kind, "url": controller_url, "hosts": self.hosts,
                               "timeout": self.args.timeout, "rollout": self.args.rollout,
                               "timeline": self.args.timeline,
                               "floor_rounds": self.args.floor_rounds}
        pub: Path | None = None
        if self.kind in FLOORS:
            cfg["payload_size"] = desired_size()
            cfg["protocol"] = FLOORS[self.kind]
        else:
            from controller.state.keys import init_keys
            state = self.dir / "controller"
            _, pub = init_keys(state)
            cfg["state_dir"] = str(state)
        cfg_path = self.dir / "controller.json"
        cfg_path.write_text(json.dumps(cfg))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLEET_MQTT_VERSION": self.mqtt_version}
        self.controller = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_controller", str(cfg_path)],
            stdout=subprocess.PIPE, stderr=open(self.dir / "controller.log", "wb"),  # noqa: SIM115
            text=True, env={**env, **self.args.controller_env}, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        # The broker and the controller run in sessions of their own, the agent processes
        # all stay in ours: with the kernel's autogroup scheduling (on by default) each
        # session gets a fair share of the CPU, so the simulated fleet, however many
        # processes it uses, competes with the broker and the controller as one party,
        # like remote hosts would, and cannot starve them (20 agent processes in 20
        # sessions left the broker 1/22 of the CPU and inflated PUBACK times to seconds).
        agents_dir = self.dir / "agents"
        agents_dir.mkdir()
        for i, chunk in enumerate(self.chunks()):
            url = agent_urls[i % len(agent_urls)]
            hosts_file = self.dir / f"hosts-{i}.txt"
            hosts_file.write_text("\n".join(chunk))
            if self.kind in FLOORS:
                argv = [sys.executable, str(Path(__file__).with_name("floor_agents.py")),
                        "--broker", url, "--hosts-file", str(hosts_file),
                        "--protocol", FLOORS[self.kind]]
            else:
                argv = [sys.executable, "-m", "client", "simulate", "--hosts", ",".join(chunk),
                        "--state-dir", str(agents_dir), "--trust-key", str(pub),
                        "--broker", url, "--sim-fetch-delay", "0",
                        "--sim-switch-delay", "0", "--sim-fail-rate", str(self.args.fail_rate),
                        "--sim-seed", "bench"]
            self.agents.append(subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, cwd=REPO, env={**env, **self.args.agent_env},
                stderr=open(self.dir / f"agents-{i}.log", "wb")))  # noqa: SIM115

    def _read(self) -> None:
        assert self.controller is not None and self.controller.stdout is not None
        for line in self.controller.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_marker(self, deadline: float) -> dict[str, Any]:
        while True:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line == "":
                for i, a in enumerate(self.agents):
                    if a.poll() is not None:
                        raise RuntimeError(f"{self.kind} agent process {i} exited with "
                                           f"{a.returncode}; see {self.dir}/agents-{i}.log")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} phase timed out")
                continue
            if line is None:
                tail = (self.dir / "controller.log").read_text()[-2000:]
                raise RuntimeError(f"{self.kind} controller exited early:\n{tail}")
            with contextlib.suppress(ValueError):
                return dict(json.loads(line))

    def cpu(self) -> dict[str, float]:
        brokers = self.broker.nodes if hasattr(self.broker, "nodes") else [self.broker]
        return {"broker": sum(proc_cpu(b.proc.pid) for b in brokers if b.proc is not None),
                "agents": sum(proc_cpu(a.pid) for a in self.agents),
                "agents_sys": sum(proc_cpu(a.pid, system_only=True) for a in self.agents),
                "machine": machine_busy()}

    def spy(self, out: Path) -> None:
        binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        assert self.controller is not None
        targets = [("controller", self.controller.pid)]
        targets += [(f"agents-{i}", a.pid) for i, a in enumerate(self.agents)]
        out.mkdir(parents=True, exist_ok=True)
        for name, pid in targets:
            self.spies.append(subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--rate", os.environ.get("SPY_RATE", "100"),
                 "--nonblocking", "--gil", "--format", "raw",
                 "--output", str(out / f"{self.kind}-{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def run(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.timeout + 120
        started = time.monotonic()
        self.start()
        ready = self.next_marker(deadline)
        log(f"{self.kind}: {len(self.hosts)} agents in {len(self.agents)} process(es) online "
            f"after {time.monotonic() - started:.1f}s")
        t0 = self.next_marker(deadline)
        assert t0["ev"] == "t0", t0
        cpu0, wall0 = self.cpu(), time.monotonic()
        if self.args.py_spy:
            self.spy(Path(self.args.py_spy))
        end = self.next_marker(deadline)
        assert end["ev"] == "end", end
        cpu1, wall1 = self.cpu(), time.monotonic()
        for s in self.spies:
            s.send_signal(signal.SIGINT)
        result = self.next_marker(deadline)
        result["startup_s"] = ready["startup_s"]
        result["agent_procs"] = len(self.agents)
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        cpu["controller"] = result.pop("controller_cpu_s")
        # Whatever else ran on this machine meanwhile (other test suites): noise to report.
        cpu["others"] = cpu["machine"] - cpu["broker"] - cpu["agents"] - cpu["controller"]
        # (agents_sys is the kernel part of agents: syscalls, fsync, socket I/O)
        result["cpu_s"] = {"window": round(wall1 - wall0, 3),
                           "cores": os.cpu_count(), **{k: round(v, 2) for k, v in cpu.items()}}
        return result

    def stop(self) -> None:
        for s in self.spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.wait(timeout=30)
        procs = [p for p in [self.controller, *self.agents] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.broker is not None:
            self.broker.stop()


def run_phase(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    phase = Phase(kind, args, work)
    try:
        return phase.run()
    finally:
        phase.stop()


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine makes numbers noisy."""
    return [round(x, 2) for x in os.getloadavg()]


# (key, what, limit): the issue 13 targets, each a ratio to the floor except RSS.
TARGETS = [
    ("acked_ratio", "acked / floor", 1.5),
    ("done_ratio", "done / floor", 5.0),
    ("controller_cpu_ratio", "controller CPU per host / floor controller's", 1.5),
    ("agent_cpu_ratio", "agent CPU per deploy / floor agent's", 3.0),
    ("controller_rss_mb", "controller peak RSS MB", 100.0),
]


def targets(out: dict[str, Any], per_host: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Each target with its value and whether it is met (None: not measured this run).
    The ratios are judged at 1,000 hosts, completion and RSS at any size."""
    floor, flot = per_host.get("floor"), per_host["flotilla"]
    values = {
        "acked_ratio": out["acked_ratio"], "done_ratio": out["done_ratio"],
        "controller_cpu_ratio": ratio(flot["controller"], floor["controller"]) if floor else None,
        "agent_cpu_ratio": ratio(flot["agents"], floor["agents"]) if floor else None,
        "controller_rss_mb": out["controller_rss_mb"],
    }
    result: dict[str, Any] = {}
    for key, what, limit in TARGETS:
        value = values[key]
        result[key] = {"what": what, "value": value, "limit": limit,
                       "met": None if value is None else value <= limit}
    result["completes"] = {"what": "every host succeeded", "value": out["status"],
                           "limit": "succeeded", "met": out["status"] == "succeeded"}
    return result


def print_table(out: dict[str, Any]) -> None:
    """A side-by-side table on stderr; the last stdout line stays the JSON object."""
    per_host = out.get("cpu_ms_per_host", {})
    floor, flot = per_host.get("floor", {}), per_host.get("flotilla", {})
    proto = per_host.get("protocol", {})
    pf = out.get("protocol_floor") or {}

    def f(x: Any, unit: str = "") -> str:
        return "-" if x is None else (f"{x:.3f}{unit}" if isinstance(x, float) else str(x))

    rows = [("acked s", out["floor_s"], pf.get("acked_s"), out["acked_s"]),
            ("done s", out["floor_s"], pf.get("done_s"), out["done_s"]),
            ("controller CPU ms/host", floor.get("controller"), proto.get("controller"),
             flot.get("controller")),
            ("agent CPU ms/deploy", floor.get("agents"), proto.get("agents"), flot.get("agents"))]
    lines = [f"fanout: {out['hosts']} hosts via {out['broker']}, status {out.get('status')}, "
             f"controller RSS {out.get('controller_rss_mb')} MB, load {out['load_before']} -> "
             f"{out.get('load_after')}",
             f"  {'':24} {'floor':>10} {'protocol':>10} {'flotilla':>10} {'ratio':>7}"
             f" {'proto/floor':>11} {'flot/proto':>10}"]
    for name, a, p, b in rows:
        lines.append(f"  {name:24} {f(a):>10} {f(p):>10} {f(b):>10} {f(ratio(b, a)):>7}"
                     f" {f(ratio(p, a)):>11} {f(ratio(b, p)):>10}")
    if "lean_floor" in out:
        lean, lf = per_host.get("lean", {}), out["lean_floor"]
        lines.append("  lean protocol / floor: " + ", ".join(
            f"{name} {f(ratio(b, a))}" for name, a, b in [
                ("acked", out["floor_s"], lf["acked_s"]), ("done", out["floor_s"], lf["done_s"]),
                ("controller CPU", floor.get("controller"), lean.get("controller")),
                ("agent CPU", floor.get("agents"), lean.get("agents"))]))
    for t in out.get("targets", {}).values():
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  target {t['what']}: {f(t['value'])} (limit {t['limit']}) {met}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def r3(x: float | None) -> float | None:
    return round(x, 3) if x is not None else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_controller"]:
        return child_main(argv[1])
    # `timeout 600 bench/fanout.py ...` or a CI's kill: stop the brokers and agents
    # (each in a session of its own, so they get no signal of their own) on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, metavar="N", help="number of simulated hosts")
    p.add_argument("--flotilla-only", action="store_true", help="skip the floor")
    p.add_argument("--rollout", action="store_true",
                   help="deploy as a rollout with batches of 10%% and max-failures 5%%")
    p.add_argument("--rss", action="store_true",
                   help="controller peak RSS run (implies --flotilla-only)")
    p.add_argument("--per-proc", type=int, default=250, help="agents per process")
    p.add_argument("--fail-rate", type=float, default=0.0, help="simulated failure rate")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per phase")
    p.add_argument("--py-spy", metavar="DIR",
                   help="record py-spy raw profiles of controller and agents into DIR")
    p.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the agent processes (experiments)")
    p.add_argument("--controller-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the controller process (experiments)")
    p.add_argument("--broker-conf", action="append", default=[], metavar="LINE",
                   help="extra mosquitto.conf line, appended (experiments)")
    p.add_argument("--timeline", action="store_true",
                   help="add detail.flotilla.timeline (messages by type per 0.5 s) and"
                        " rss_series ([s, RSS MB, unhandled messages] every 0.5 s)")
    p.add_argument("--broker", choices=["mosquitto", "nats-cluster"], default="mosquitto",
                   help="a fresh Mosquitto per phase, or a 3-node NATS JetStream cluster "
                        "(MQTT 3.1.1; agents on nodes 2-3, the controller on node 1)")
    p.add_argument("--floor-rounds", type=int, default=3,
                   help="fan-outs in the floor phase; floor_s is their median")
    p.add_argument("--no-protocol-floor", action="store_true",
                   help="skip the protocol floor (bare agents sending Flotilla's packets)")
    p.add_argument("--lean-floor", action="store_true",
                   help="also measure the lean protocol (two retained states per deploy)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("N must be at least 1")
    for name in ("agent_env", "controller_env"):
        pairs = [kv.partition("=") for kv in getattr(args, name)]
        if any(not sep for _, sep, _ in pairs):
            p.error(f"--{name.replace('_', '-')} takes KEY=VALUE")
        setattr(args, name, {k: v for k, _, v in pairs})
    nofile = raise_nofile()
    need = args.n + 64
    if nofile[0] < need:
        log(f"warning: RLIMIT_NOFILE is {nofile[0]}, mosquitto needs ~{need} for {args.n} "
            "clients")
    work = Path(tempfile.mkdtemp(prefix="flotilla-bench-"))
    log(f"work dir {work}, RLIMIT_NOFILE {nofile}")
    out: dict[str, Any] = {"hosts": args.n, "broker": args.broker, "floor_s": None,
                           "acked_s": None, "done_s": None, "acked_ratio": None,
                           "done_ratio": None}
    detail: dict[str, Any] = {"nofile": nofile[0]}
    out["load_before"] = load_average()
    try:
        floor = None
        if not (args.flotilla_only or args.rss):
            res = run_phase("floor", args, work)
            floor = res["floor_s"]
            detail["floor"] = {k: r3(v) if isinstance(v, float) else v for k, v in res.items()
                               if k not in ("ev", "floor_s")}
            log(f"floor: {floor:.3f}s")
            if not args.no_protocol_floor:
                res = run_phase("protocol", args, work)
                detail["protocol"] = {k: r3(v) if isinstance(v, float) else v
                                      for k, v in res.items() if k != "ev"}
                out["protocol_floor"] = {"acked_s": r3(res["acked_s"]),
                                         "done_s": r3(res["floor_s"])}
                log(f"protocol floor: acked {res['acked_s']:.3f}s, done {res['floor_s']:.3f}s")
            if args.lean_floor:
                res = run_phase("lean", args, work)
                detail["lean"] = {k: r3(v) if isinstance(v, float) else v
                                  for k, v in res.items() if k != "ev"}
                out["lean_floor"] = {"acked_s": r3(res["acked_s"]), "done_s": r3(res["floor_s"])}
                log(f"lean floor: acked {res['acked_s']:.3f}s, done {res['floor_s']:.3f}s")
        res = run_phase("flotilla", args, work)
        out.update(floor_s=r3(floor), acked_s=r3(res["acked_s"]), done_s=r3(res["done_s"]),
                   acked_ratio=ratio(res["acked_s"], floor), done_ratio=ratio(res["done_s"], floor))
        if args.rollout:
            out.update(rollout_s=r3(res["rollout_s"]), rollout_ratio=ratio(res["rollout_s"], floor),
                       status=res["status"])
        out["status"] = res["status"]
        out["controller_rss_mb"] = round(res["controller_rss_mb"], 1)
        detail["flotilla"] = {k: r3(v) if isinstance(v, float) else v for k, v in res.items()
                              if k not in ("ev", "acked_s", "done_s", "controller_rss_mb")}
        # Per host and deploy: the floor's window holds --floor-rounds fan-outs.
        deploys = {"floor": args.n * args.floor_rounds,
                   "protocol": args.n * args.floor_rounds, "lean": args.n * args.floor_rounds,
                   "flotilla": args.n}
        out["cpu_ms_per_host"] = per_host = {
            phase: {"controller": round(d["cpu_s"]["controller"] * 1000 / deploys[phase], 3),
                    "agents": round(d["cpu_s"]["agents"] * 1000 / deploys[phase], 3)}
            for phase, d in detail.items() if phase in deploys}
        out["targets"] = targets(out, per_host)
        out["load_after"] = load_average()
        out["detail"] = detail
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(out)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
