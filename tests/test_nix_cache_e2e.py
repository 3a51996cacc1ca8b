"""Issue 12: every host its own system, built per host on the controller, shipped through
a signed binary cache, with the REAL Nix (nix-bin 2.8 here; the code also speaks to
current Nix): real builds, `nix store sign`, `nix copy` to and from a file:// cache,
paths deleted from the local store in between so that agents really fetch them, and
signatures checked. `systemd-run` is the only stand-in (there is no systemd here).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Fleet, wait_for
from tests.nixfleet import (
    NIX_CONFIG,
    FleetFlake,
    NixHost,
    cache_key,
    require_real_nix,
    write_fleet_flake,
)

WEB = {"web1": ["web"], "web2": ["web", "eu"], "web3": ["web"]}


@pytest.fixture
def real_nix(monkeypatch: pytest.MonkeyPatch) -> None:
    require_real_nix()
    monkeypatch.setenv("NIX_REMOTE", "")
    monkeypatch.setenv("NIX_CONFIG", NIX_CONFIG)


def flake_fleet(make_fleet: Any, tmp_path: Path, hosts: dict[str, list[str]],
                failing: tuple[str, ...] = ()) -> tuple[Fleet, FleetFlake]:
    """A fleet whose inventory is the flake itself (no fleet.toml)."""
    fleet: Fleet = make_fleet(hosts)
    fleet.inventory.unlink()
    flake = write_fleet_flake(tmp_path, hosts, failing)
    return fleet, flake


def start_nix_agents(fleet: Fleet, tmp_path: Path, names: list[str]) -> dict[str, NixHost]:
    hosts = {h: NixHost(tmp_path, h) for h in names}
    for h, nh in hosts.items():
        fleet.start_agent(h, "--backend", "nixos", "--root", str(nh.fake.root), env=nh.env())
    return hosts


def results(fleet: Fleet, names: list[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Each host's recorded result (its journal), once every host has one."""
    def done() -> dict[str, dict[str, Any]] | None:
        out = {}
        for h in names:
            path = fleet.state_dir(h) / "journal.jsonl"
            recs = [json.loads(ln) for ln in path.read_text().splitlines()] \
                if path.exists() else []
            res = [r for r in recs if r.get("kind") == "result"]
            if not res:
                return None
            out[h] = res[-1]
        return out
    found: dict[str, dict[str, Any]] = wait_for(done, timeout=timeout,
                                                what=f"results of {names}")
    return found


def build(fleet: Fleet, flake: FleetFlake, selector: str, *extra: str) -> tuple[int, Any]:
    return fleet.fleetctl_json("build", selector, "--flake", flake.ref, *extra, timeout=300)


def test_three_hosts_deploy_from_the_flake_through_a_signed_cache(
        real_nix: None, make_fleet: Any, tmp_path: Path) -> None:
    fleet, flake = flake_fleet(make_fleet, tmp_path, {**WEB, "db1": ["db"]})
    secret, public = cache_key(tmp_path)
    cache = f"file://{tmp_path / 'cache'}"
    # Hosts and tags come from the flake: @web is web1-3, not db1.
    rc, hosts = fleet.fleetctl_json("hosts", "--flake", flake.ref)
    assert rc == 0 and [{"host": r["host"], "tags": r["tags"]} for r in hosts] == [
        {"host": h, "tags": t} for h, t in  # Nix sorts names
                                 sorted({**WEB, "db1": ["db"]}.items())]
    rc, out = fleet.fleetctl_json("deploy", "@web", "--flake", flake.ref, "--cache", cache,
                                  "--sign-key", str(secret), "--no-wait", timeout=300)
    assert rc == 0, out
    assert sorted(out["hosts"]) == sorted(WEB)
    narinfos = sorted((tmp_path / "cache").glob("*.narinfo"))
    assert len(narinfos) == 6  # three toplevels and their kernels
    assert all(f"Sig: {public.split(':')[0]}:" in n.read_text() for n in narinfos)
    paths = {}
    for n in narinfos:
        path = next(ln.split(": ", 1)[1] for ln in n.read_text().splitlines()
                    if ln.startswith("StorePath: "))
        if "-nixos-system-" in path:
            paths[path.split("-nixos-system-")[1].split("-")[0]] = path
    assert sorted(paths) == sorted(WEB) and len(set(paths.values())) == 3
    # The closures leave this machine's store: the agents must fetch them from the cache.
    flake.delete_from_store(list(paths.values()))
    agents = start_nix_agents(fleet, tmp_path, list(WEB))
    done = results(fleet, list(WEB))
    for h, nh in agents.items():
        assert done[h]["status"] == "succeeded", (h, done[h])
        assert nh.current == paths[h]  # each host on its own toplevel
        assert nh.stc_log == [f"switch NIXOS_INSTALL_BOOTLOADER=0 {paths[h]}"]
        assert Path(paths[h], "nixos-version").read_text().startswith(f"25.11-{h}-")
        assert nh.fake.profile_target == paths[h]
    # --build-on host keeps the comin-style path: the host builds its own toplevel
    # (`nix build --json`, which Nix 2.8 has and --print-out-paths is not).
    db1 = start_nix_agents(fleet, tmp_path, ["db1"])["db1"]
    rc, out = fleet.fleetctl_json("deploy", "db1", "--flake", flake.ref, "--build-on", "host",
                                  timeout=120)
    assert rc == 0 and out["hosts"] == {"db1": "succeeded"}, out
    assert "-nixos-system-db1-" in db1.current and db1.current.startswith("/nix/store/")
    assert db1.stc_log == [f"switch NIXOS_INSTALL_BOOTLOADER=0 {db1.current}"]


def test_build_writes_deploy_json_and_a_failed_host_does_not_stop_the_others(
        real_nix: None, make_fleet: Any, tmp_path: Path) -> None:
    hosts = {"web1": ["web"], "web2": ["web"], "broken1": ["web"]}
    fleet, flake = flake_fleet(make_fleet, tmp_path, hosts, failing=("broken1",))
    secret, public = cache_key(tmp_path)
    cache = f"file://{tmp_path / 'cache'}"
    out_file = tmp_path / "deploy.json"
    rc, out = build(fleet, flake, "@web", "--cache", cache, "--sign-key", str(secret),
                    "--out", str(out_file), "--max-jobs", "2")
    assert rc == 1, out  # one host failed
    assert "broken1 does not build (on purpose)" in out["failed"]["broken1"]
    doc = json.loads(out_file.read_text())
    assert sorted(doc["agents"]) == ["web1", "web2"]
    assert doc["agents"]["web1"] != doc["agents"]["web2"]
    assert doc["cache"] == cache and doc["cache_public_key"] == public
    assert all(os.path.isdir(p) for p in doc["agents"].values())
    assert {"build_s", "push_s"} <= set(out["timings"])
    # Selected hosts missing from the file: exit 2 naming them, nothing published.
    r = fleet.fleetctl("deploy", "@web", "--systems", str(out_file), "--flake", flake.ref)
    assert r.returncode == 2
    assert "has no system for broken1" in r.stderr and "Traceback" not in r.stderr
    assert not (fleet.controller_dir / "state.jsonl").exists()
    # deploy --flake with a host that does not build: nothing is deployed at all.
    r = fleet.fleetctl("deploy", "@web", "--flake", flake.ref, "--cache", cache,
                       "--sign-key", str(secret), timeout=300)
    assert r.returncode == 1 and "broken1: build failed" in r.stderr
    assert "nothing was deployed" in r.stderr
    # progress per host, one line per change when not on a terminal
    assert "web1: building" in r.stderr and "web2: built: /nix/store/" in r.stderr
    assert "broken1: failed: " in r.stderr
    assert not (fleet.controller_dir / "state.jsonl").exists()


def nar_file(cache_dir: Path, path: str) -> Path:
    info = cache_dir / f"{Path(path).name.split('-')[0]}.narinfo"
    return cache_dir / next(ln.split(": ", 1)[1] for ln in info.read_text().splitlines()
                            if ln.startswith("URL: "))


def tamper_nar(cache_dir: Path, path: str, other: str) -> None:
    """Give `path` another (valid, compressed) NAR: what a tampered cache serves."""
    nar_file(cache_dir, path).write_bytes(nar_file(cache_dir, other).read_bytes())


def strip_signature(cache_dir: Path, path: str) -> None:
    info = cache_dir / f"{Path(path).name.split('-')[0]}.narinfo"
    lines = info.read_text().splitlines()
    assert any(ln.startswith("Sig: ") for ln in lines)
    info.write_text("".join(f"{ln}\n" for ln in lines if not ln.startswith("Sig: ")))


def test_a_tampered_nar_and_an_unsigned_path_are_refused(
        real_nix: None, make_fleet: Any, tmp_path: Path) -> None:
    fleet, flake = flake_fleet(make_fleet, tmp_path, WEB)
    secret, _ = cache_key(tmp_path)
    cache_dir = tmp_path / "cache"
    out_file = tmp_path / "deploy.json"
    rc, out = build(fleet, flake, "@web", "--cache", f"file://{cache_dir}", "--sign-key",
                    str(secret), "--out", str(out_file))
    assert rc == 0, out
    paths = json.loads(out_file.read_text())["agents"]
    flake.delete_from_store(list(paths.values()))
    tamper_nar(cache_dir, paths["web1"], paths["web3"])
    strip_signature(cache_dir, paths["web2"])
    agents = start_nix_agents(fleet, tmp_path, list(WEB))
    rc, out = fleet.fleetctl_json("deploy", "@web", "--systems", str(out_file), "--flake",
                                  flake.ref, "--max-failures", "3", timeout=120)
    assert rc == 1, out
    assert out["hosts"] == {"web1": "failed", "web2": "failed", "web3": "succeeded"}
    done = results(fleet, list(WEB))
    assert "does not match the signed hash" in done["web1"]["message"], done["web1"]
    assert "not signed by the trusted cache key flotilla-test-1" in done["web2"]["message"]
    for h in ("web1", "web2"):  # nothing switched, nothing valid in the store
        assert agents[h].stc_log == [] and agents[h].current == agents[h].old
        assert agents[h].fake.profile_target == agents[h].old
        assert subprocess.run(["nix-store", "--check-validity", paths[h]],
                              capture_output=True).returncode != 0
    assert agents["web3"].current == paths["web3"]
