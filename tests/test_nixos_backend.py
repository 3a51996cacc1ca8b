"""Issue 4: the nixos backend against a fake root and fake nix/systemd commands.

Pure decisions are table-tested; the backend itself runs the fake executables in
tests/fakenix (real processes, real symlinks); the end-to-end tests run the real
agent process with `--backend nixos --root` through a real Mosquitto.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from client.host.backend import BackendError, SwitchOutcome
from client.host.nixos import (
    FlakeRef,
    NixosBackend,
    StorePath,
    SwitchRecord,
    boot_files_differ,
    classify_system,
    fetch_commands,
    interpret_switch_exit,
    profile_rollback_command,
    switch_commands,
)
from protocol.models import BinaryCache
from tests.fakeroot import FakeRoot, activation, store_hash
from tests.helpers import wait_for

S = "/nix/store"
H = "a" * 32
NIX = ["nix", "--extra-experimental-features", "nix-command flakes"]
TOPLEVEL = ".config.system.build.toplevel"


# -- pure decisions -----------------------------------------------------------------------

@pytest.mark.parametrize(("system", "expected"), [
    (f"{S}/{H}-nixos-system-web1-25.11", StorePath(f"{S}/{H}-nixos-system-web1-25.11")),
    (f"{S}/{H}-nixos-system-web1/", StorePath(f"{S}/{H}-nixos-system-web1")),
    ("github:acme/fleet", FlakeRef("github:acme/fleet", "web1")),
    ("/etc/nixos", FlakeRef("/etc/nixos", "web1")),
    ("git+https://git.acme/fleet?ref=main#db-2", FlakeRef("git+https://git.acme/fleet?ref=main",
                                                          "db-2")),
    (f"{S}-not-the-store/{H}-x", FlakeRef(f"{S}-not-the-store/{H}-x", "web1")),
])
def test_classify_system(system: str, expected: object) -> None:
    assert classify_system(system, S, "web1") == expected


@pytest.mark.parametrize(("system", "fragment"), [
    ("", "empty"),
    ("github:a/b c", "whitespace"),
    (f"{S}/../etc/shadow", "invalid store path"),
    (f"{S}/short-hash", "invalid store path"),
    (f"{S}/{H}-x/bin/sh", "invalid store path"),
    (f"{S}/", "invalid store path"),
    ("--impure", "must not start with '-'"),
    ("github:a/b#", "REF#HOSTNAME"),
    ("github:a/b#x y", "whitespace"),
    ("github:a/b#a.b\"c", "REF#HOSTNAME"),
    ("#web1", "nothing before"),
])
def test_classify_system_refuses_bad_input(system: str, fragment: str) -> None:
    with pytest.raises(BackendError, match=fragment) as exc:
        classify_system(system, S, "web1")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("target", "cache", "expected"), [
    (StorePath(f"{S}/{H}-sys"), None, [["nix-store", "--realise", f"{S}/{H}-sys"]]),
    (StorePath(f"{S}/{H}-sys"), "https://cache.acme", [
        [*NIX, "copy", "--from", "https://cache.acme", f"{S}/{H}-sys"],
        ["nix-store", "--realise", f"{S}/{H}-sys"]]),
    (FlakeRef("github:acme/fleet", "web1"), "https://ignored", [
        [*NIX, "build", "--no-link", "--json",
         f"github:acme/fleet#nixosConfigurations.web1{TOPLEVEL}"]]),
    (FlakeRef(".", "1web"), None, [
        [*NIX, "build", "--no-link", "--json",
         f'.#nixosConfigurations."1web"{TOPLEVEL}']]),
])
def test_fetch_commands(target: StorePath | FlakeRef, cache: str | None,
                        expected: list[list[str]]) -> None:
    assert fetch_commands(target, cache) == expected


KEY = "cache-1:" + "A" * 43 + "="


def test_the_cache_named_by_the_desired_wins_and_checks_signatures() -> None:
    """Issue 12: only the controller's cache, only its key, signatures required."""
    named = BinaryCache(url="file:///srv/cache", public_key=KEY)
    assert fetch_commands(StorePath(f"{S}/{H}-sys"), "https://agent-default", named) == [
        [*NIX, "copy", "--from", "file:///srv/cache", "--option", "require-sigs", "true",
         "--option", "trusted-public-keys", KEY, f"{S}/{H}-sys"],
        ["nix-store", "--realise", f"{S}/{H}-sys"]]


@pytest.mark.parametrize(("code", "expected"), [
    (0, SwitchOutcome()),
    (4, SwitchOutcome(exit_code=4, units_failed=True)),
])
def test_switch_exit_codes_with_meaning(code: int, expected: SwitchOutcome) -> None:
    assert interpret_switch_exit(code, "switch", ["line"]) == expected


INHIBITED = ["Checking switch inhibitors...", "Found diff in switch inhibitors:",
             "The new configuration contains changes to packages that were",
             "listed as switch inhibitors.", "Pre-switch checks failed"]


@pytest.mark.parametrize(("code", "action", "tail", "expected"), [
    # switch-to-configuration(-ng) exits 1 when a pre-switch check (the inhibitors) fails
    (1, "switch", INHIBITED, SwitchOutcome(exit_code=1, inhibited=True)),
    (1, "test", INHIBITED, SwitchOutcome(exit_code=1, inhibited=True)),
])
def test_a_switch_refused_by_inhibitors_is_its_own_outcome(
        code: int, action: str, tail: list[str], expected: SwitchOutcome) -> None:
    assert interpret_switch_exit(code, action, tail) == expected


@pytest.mark.parametrize(("code", "what"), [
    (1, ""), (2, " (the activation script failed)"), (127, ""), (-9, ""),
    # 100 is no switch-to-configuration exit code (nixops' convention): an error like any
    (100, ""),
])
def test_other_switch_exit_codes_are_errors_with_the_last_lines(code: int, what: str) -> None:
    tail = ["activating...", "", "error: the activation script failed"]
    with pytest.raises(BackendError) as exc:
        interpret_switch_exit(code, "boot", tail)
    msg = str(exc.value)
    assert msg == (f"switch-to-configuration boot failed (exit {code}){what}: activating... | "
                   "error: the activation script failed")
    with pytest.raises(BackendError):  # boot is not checked by inhibitors: exit 1 is an error
        interpret_switch_exit(1, "boot", INHIBITED)


def test_switch_commands_refuse_unknown_actions() -> None:
    with pytest.raises(BackendError, match="unknown action 'reboot'"):
        switch_commands("/p", f"{S}/{H}-sys", "reboot")
    assert switch_commands("/p", f"{S}/{H}-sys", "dry-activate") == [
        activation(f"{S}/{H}-sys", "dry-activate")]  # profile untouched
    assert switch_commands("/p", f"{S}/{H}-sys", "boot", systemd=False) == [
        ["nix-env", "-p", "/p", "--set", f"{S}/{H}-sys"],
        [f"{S}/{H}-sys/bin/switch-to-configuration", "boot"]]


PROFILE = "/nix/var/nix/profiles/system"
OLD, NEW, OLDER = f"{S}/{H}-old", f"{S}/{H}-new", f"{S}/{H}-older"


@pytest.mark.parametrize(("record", "profile_target", "gens", "expected"), [
    # a switch set the profile to NEW (gen 3); OLD is gen 2 → exactly that generation
    (SwitchRecord(NEW, "switch", OLD), NEW, {1: OLDER, 2: OLD, 3: NEW},
     ["nix-env", "-p", PROFILE, "--switch-generation", "2"]),
    # OLD appears twice: the newest generation that links to it
    (SwitchRecord(NEW, "boot", OLD), NEW, {1: OLD, 2: OLDER, 3: OLD, 4: NEW},
     ["nix-env", "-p", PROFILE, "--switch-generation", "3"]),
    # OLD was never in the profile (it ran from a `test`): undo our --set
    (SwitchRecord(NEW, "switch", OLDER), NEW, {1: OLDER, 2: NEW},
     ["nix-env", "-p", PROFILE, "--rollback"]),
    # no record (state dir lost): still go back by generation
    (None, NEW, {1: OLD, 2: NEW}, ["nix-env", "-p", PROFILE, "--switch-generation", "1"]),
    # a `test` deploy never touched the profile: leave it alone
    (SwitchRecord(NEW, "test", OLDER), OLDER, {1: OLDER}, None),
    (SwitchRecord(NEW, "test", OLDER), OLDER, {1: OLDER, 2: OLD}, None),
    # the profile already points at the previous system (failed before --set)
    (SwitchRecord(NEW, "switch", OLD), OLD, {1: OLD}, None),
])
def test_profile_rollback_command(record: SwitchRecord | None, profile_target: str,
                                  gens: dict[int, str], expected: list[str] | None) -> None:
    assert profile_rollback_command(PROFILE, record, profile_target, OLD, gens) == expected


K = {"kernel": "/s/k1/bzImage", "initrd": "/s/i1/initrd", "kernel-modules": "/s/m1"}


@pytest.mark.parametrize(("new", "differ"), [
    (dict(K), False),
    ({**K, "kernel": "/s/k2/bzImage"}, True),
    ({**K, "initrd": "/s/i2/initrd"}, True),
    ({**K, "kernel-modules": "/s/m2"}, True),
    ({**K, "kernel-modules": None}, True),
])
def test_boot_files_differ(new: dict[str, str | None], differ: bool) -> None:
    assert boot_files_differ(K, new) is differ
    container = dict.fromkeys(K, None)  # boot.isContainer systems have no kernel at all
    assert boot_files_differ(container, container) is False


# -- the backend against a fake root --------------------------------------------------------

@pytest.fixture
def backend(fake: FakeRoot, tmp_path: Path) -> NixosBackend:
    return NixosBackend(root=fake.root, state_dir=tmp_path / "state")


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.parametrize("action", ["switch", "boot", "test"])
async def test_switch_runs_exactly_what_nixos_rebuild_runs(
        fake: FakeRoot, backend: NixosBackend, action: str) -> None:
    old, new = fake.system("old"), fake.system("new")
    fake.install(old)
    progress = Lines()
    outcome = await backend.switch(new, action, progress)
    assert outcome == SwitchOutcome()
    profile = str(fake.profile)
    set_profile = [["nix-env", "-p", profile, "--set", new]] if action != "test" else []
    assert fake.calls() == [*set_profile, activation(new, action),
                            ["switch-to-configuration", action]]
    assert fake.profile_target == (old if action == "test" else new)
    assert fake.current == (old if action == "boot" else new)
    assert backend.current_system() == fake.current
    assert "activating the configuration..." in progress.lines


@pytest.mark.parametrize(("code", "expected"), [
    (4, SwitchOutcome(exit_code=4, units_failed=True)),
])
async def test_switch_exit_4_is_an_outcome(
        fake: FakeRoot, backend: NixosBackend, code: int, expected: SwitchOutcome) -> None:
    fake.install(fake.system("old"))
    new = fake.system("new", stc_exit=code)
    progress = Lines()
    assert await backend.switch(new, "switch", progress) == expected
    if code == 4:
        assert "warning: the following units failed: broken.service" in progress.lines


async def test_inhibited_switch_restores_the_boot_default(
        fake: FakeRoot, backend: NixosBackend) -> None:
    """Issue 12: refused by switch inhibitors = nothing activated, profile back as it was."""
    old = fake.system("old")
    fake.install(old)
    new = fake.system("new", inhibited=True)
    outcome = await backend.switch(new, "switch", Lines())
    assert outcome == SwitchOutcome(exit_code=1, inhibited=True)
    assert fake.profile_target == old and fake.current == old
    assert fake.calls()[-1] == ["nix-env", "-p", str(fake.profile), "--switch-generation", "1"]
    # boot is not checked by the inhibitors: it is the way to take this system
    assert await backend.switch(new, "boot", Lines()) == SwitchOutcome()
    assert fake.profile_target == new and fake.current == old


async def test_install_bootloader_no_systemd_and_dry_activate(
        fake: FakeRoot, backend: NixosBackend) -> None:
    """NIXOS_INSTALL_BOOTLOADER is 1 or 0 (as nixos-rebuild-ng sets it); without
    /run/systemd/system switch-to-configuration runs directly; dry-activate touches
    neither the profile nor the running system."""
    old, new = fake.system("old"), fake.system("new")
    fake.install(old)
    progress = Lines()
    assert await backend.switch(new, "dry-activate", progress) == SwitchOutcome()
    assert fake.calls() == [activation(new, "dry-activate"),
                            ["switch-to-configuration", "dry-activate"]]
    assert "would restart the following units: nginx.service" in progress.lines
    assert fake.profile_target == old and fake.current == old
    fake.clear_calls()
    await backend.switch(new, "boot", Lines(), install_bootloader=True)
    (fake.root / "run/systemd/system").rmdir()  # a container: no systemd as PID 1
    await backend.switch(new, "switch", Lines())
    assert fake.calls() == [["nix-env", "-p", str(fake.profile), "--set", new],
                            activation(new, "boot"), ["switch-to-configuration", "boot"],
                            ["nix-env", "-p", str(fake.profile), "--set", new],
                            ["switch-to-configuration", "switch"]]
    assert fake.stc_env() == ["1", "0"]
    assert fake.current == new


async def test_switch_failure_is_one_line_with_the_output_tail(
        fake: FakeRoot, backend: NixosBackend) -> None:
    fake.install(fake.system("old"))
    new = fake.system("new", stc_exit=1)
    with pytest.raises(BackendError) as exc:
        await backend.switch(new, "switch", Lines())
    assert str(exc.value) == ("switch-to-configuration switch failed (exit 1): activating the "
                              "configuration... | setting up /etc... | error: activation script "
                              "failed")
    fake.fail("nix-env", 3)
    with pytest.raises(BackendError, match=r"^nix-env --set failed \(exit 3\): nix-env: "):
        await backend.switch(new, "boot", Lines())
    with pytest.raises(BackendError, match="not a NixOS system"):
        await backend.switch(fake.store_path("hello-2.12", None).as_posix(), "switch", Lines())


async def test_fetch_store_path_streams_progress(fake: FakeRoot, backend: NixosBackend) -> None:
    new = fake.system("new")
    progress = Lines()
    assert await backend.fetch(new, "web1", progress) == new
    assert fake.calls() == [["nix-store", "--realise", new]]
    assert any(line.startswith("these 2 paths will be fetched") for line in progress.lines)
    assert f"copying path '{new}' from 'https://cache.nixos.org'..." in progress.lines
    assert new in progress.lines  # stdout is streamed too


async def test_fetch_from_cache_copies_first(fake: FakeRoot, tmp_path: Path) -> None:
    new = fake.system("new")
    b = NixosBackend(root=fake.root, state_dir=tmp_path / "s", from_cache="s3://cache?region=x")
    progress = Lines()
    assert await b.fetch(new, "web1", progress) == new
    assert fake.calls() == [[*NIX, "copy", "--from", "s3://cache?region=x", new],
                            ["nix-store", "--realise", new]]
    assert f"copying path '{new}' from 's3://cache?region=x'..." in progress.lines


async def test_fetch_flake_ref_builds_the_host_toplevel(
        fake: FakeRoot, backend: NixosBackend) -> None:
    built = fake.system("web1-from-flake")
    fake.flake_outputs({f"github:acme/fleet#nixosConfigurations.web1{TOPLEVEL}": built,
                        f"/srv/fleet#nixosConfigurations.db-2{TOPLEVEL}": built})
    progress = Lines()
    assert await backend.fetch("github:acme/fleet", "web1", progress) == built
    assert await backend.fetch("/srv/fleet#db-2", "web1", progress) == built
    assert fake.calls() == [
        [*NIX, "build", "--no-link", "--json",
         f"github:acme/fleet#nixosConfigurations.web1{TOPLEVEL}"],
        [*NIX, "build", "--no-link", "--json",
         f"/srv/fleet#nixosConfigurations.db-2{TOPLEVEL}"]]
    assert any(line.startswith("building '") for line in progress.lines)


async def test_fetch_failures_are_one_line(fake: FakeRoot, backend: NixosBackend,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    missing = f"{fake.store}/{store_hash('gone')}-nixos-system-gone"
    with pytest.raises(BackendError) as exc:
        await backend.fetch(missing, "web1", Lines())
    assert str(exc.value) == (f"nix-store --realise failed (exit 1): error: path '{missing}' "
                              "is not valid")
    with pytest.raises(BackendError, match="does not provide attribute 'nixosConfigurations"):
        await backend.fetch("github:acme/fleet", "web1", Lines())
    fake.flake_outputs({f"github:acme/fleet#nixosConfigurations.web1{TOPLEVEL}": "/tmp/x"})
    with pytest.raises(BackendError, match="printed no store path"):
        await backend.fetch("github:acme/fleet", "web1", Lines())
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BackendError, match=r"^nix-store not found on PATH"):
        await backend.fetch(fake.system("new"), "web1", Lines())


async def test_needs_reboot_compares_booted_kernel_initrd_modules(
        fake: FakeRoot, backend: NixosBackend) -> None:
    assert backend.needs_reboot(fake.system("no-booted-system")) is False  # unknown: no claim
    fake.install(fake.system("old", kernel="6.6.1"))
    assert backend.needs_reboot(fake.system("same", kernel="6.6.1")) is False
    assert backend.needs_reboot(fake.system("newkernel", kernel="6.12.3")) is True
    assert backend.needs_reboot(fake.system("newinitrd", initrd="6.6.1-b")) is True


async def test_rollback_after_switch_goes_back_by_generation(
        fake: FakeRoot, backend: NixosBackend) -> None:
    old, new = fake.system("old"), fake.system("new")
    fake.install(old)
    await backend.switch(new, "switch", Lines())
    fake.clear_calls()
    await backend.rollback(old, Lines())
    assert fake.calls() == [["nix-env", "-p", str(fake.profile), "--switch-generation", "1"],
                            activation(old, "switch"), ["switch-to-configuration", "switch"]]
    assert fake.profile_target == old and fake.current == old


async def test_rollback_after_test_leaves_the_profile(
        fake: FakeRoot, backend: NixosBackend) -> None:
    old, new = fake.system("old"), fake.system("new")
    fake.install(old)
    await backend.switch(new, "test", Lines())
    assert fake.current == new
    fake.clear_calls()
    await backend.rollback(old, Lines())
    assert fake.calls() == [activation(old, "switch"), ["switch-to-configuration", "switch"]]
    assert fake.current == old


async def test_rollback_to_a_system_outside_the_profile_uses_rollback(
        fake: FakeRoot, backend: NixosBackend) -> None:
    booted, tested, new = fake.system("booted"), fake.system("tested"), fake.system("new")
    fake.install(booted)
    await backend.switch(tested, "test", Lines())
    await backend.switch(new, "switch", Lines())
    fake.clear_calls()
    progress = Lines()
    await backend.rollback(tested, progress)
    assert fake.calls() == [["nix-env", "-p", str(fake.profile), "--rollback"],
                            activation(tested, "switch"), ["switch-to-configuration", "switch"]]
    assert fake.profile_target == booted and fake.current == tested
    assert "switching profile from version 2 to 1" in progress.lines


async def test_rollback_refuses_without_a_previous_system(
        fake: FakeRoot, backend: NixosBackend) -> None:
    with pytest.raises(BackendError, match="no previous system"):
        await backend.rollback(None, Lines())
    with pytest.raises(BackendError, match="garbage collected"):
        await backend.rollback(f"{fake.store}/{store_hash('gc')}-nixos-system-gc", Lines())
    assert fake.calls() == []


async def test_boot_id_under_root_else_the_real_one(fake: FakeRoot, tmp_path: Path) -> None:
    b = NixosBackend(root=fake.root, state_dir=tmp_path / "s")
    first = b.boot_id()
    assert first == (fake.root / "proc/sys/kernel/random/boot_id").read_text().strip()
    fake.new_boot_id()
    assert b.boot_id() != first
    (fake.root / "proc/sys/kernel/random/boot_id").unlink()
    real = NixosBackend(root=Path("/"), state_dir=tmp_path / "s").boot_id()
    assert b.boot_id() == real


async def test_reboot_asks_systemd_then_waits_to_be_killed(fake: FakeRoot, tmp_path: Path) -> None:
    b = NixosBackend(root=fake.root, state_dir=tmp_path / "s", reboot_grace_s=0.2)
    with pytest.raises(BackendError, match=r"still up after 0s"):
        await b.reboot()
    assert fake.calls() == [["systemctl", "reboot"]]
    fake.fail("systemctl", 1)
    with pytest.raises(BackendError, match=r"^systemctl reboot failed \(exit 1\): systemctl: "):
        await b.reboot()


async def test_run_program_has_env_and_timeout(backend: NixosBackend) -> None:
    r = await backend.run_program(["sh", "-c", 'echo "$FLOTILLA_STEP"'], {"FLOTILLA_STEP": "pg"},
                                  None, 10)
    assert (r.exit_code, r.stdout) == (0, b"pg\n")
    start = time.monotonic()
    r = await backend.run_program(["sleep", "30"], {}, None, 0.3)
    assert r.timed_out and time.monotonic() - start < 5


# -- end to end: the real agent process, a real broker ------------------------------------------

def nixos_agent(fleet: Any, fake: FakeRoot, host: str = "web1") -> Any:
    return fleet.start_agent(host, "--backend", "nixos", "--root", str(fake.root))


def result_of(fleet: Any, host: str, status: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        _, rows = fleet.fleetctl_json("status", host)
        return rows[0] if rows[0]["result"] == status else None
    row: dict[str, Any] = wait_for(done, timeout=timeout, what=f"{host} to be {status}")
    return row


def rollback_calls(fake: FakeRoot, old: str) -> list[list[str]]:
    return [["nix-env", "-p", str(fake.profile), "--switch-generation", "1"],
            activation(old, "switch"), ["switch-to-configuration", "switch"]]


def test_e2e_switch_confirmed_through_the_broker(make_fleet, fake: FakeRoot) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"web1": ["web"]})
    old, new = fake.system("old"), fake.system("new", kernel="6.12.3")
    fake.install(old)
    nixos_agent(fleet, fake)
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", new, "--confirm-timeout", "20")
    assert rc == 0, out
    assert out["hosts"] == {"web1": "succeeded"}
    assert fake.calls() == [["nix-store", "--realise", new],
                            ["nix-env", "-p", str(fake.profile), "--set", new],
                            activation(new, "switch"), ["switch-to-configuration", "switch"]]
    assert fake.profile_target == new and fake.current == new
    _, rows = fleet.fleetctl_json("status", "web1")
    assert rows[0]["system"] == new and rows[0]["needs_reboot"] is True  # new kernel


def test_e2e_no_controller_confirmation_rolls_back(make_fleet, fake: FakeRoot) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"web1": ["web"]})
    old, new = fake.system("old"), fake.system("new")
    fake.install(old)
    nixos_agent(fleet, fake)
    # --no-wait: the controller publishes and leaves, so nobody confirms the generation
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", new, "--confirm", "controller",
                                  "--confirm-timeout", "2", "--no-wait")
    assert rc == 0, out

    def rolled_back() -> bool:
        _, rows = fleet.fleetctl_json("status", "web1")
        return rows[0]["result"] == "rolled_back"
    wait_for(rolled_back, timeout=30, what="the magic rollback")
    calls = fake.calls()
    assert calls[:4] == [["nix-store", "--realise", new],
                         ["nix-env", "-p", str(fake.profile), "--set", new],
                         activation(new, "switch"), ["switch-to-configuration", "switch"]]
    assert calls[4:] == rollback_calls(fake, old)
    assert fake.profile_target == old and fake.current == old
    _, rows = fleet.fleetctl_json("status", "web1")
    assert rows[0]["result"] == "rolled_back"


def test_e2e_units_failed_rolls_back(make_fleet, fake: FakeRoot) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"web1": ["web"]})
    old, new = fake.system("old"), fake.system("new", stc_exit=4)
    fake.install(old)
    nixos_agent(fleet, fake)
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", new)
    assert rc == 1 and out["hosts"] == {"web1": "rolled_back"}, out
    assert fake.calls()[-3:] == rollback_calls(fake, old)
    assert fake.current == old


def test_e2e_confirm_deadline_survives_a_reboot(make_fleet, fake: FakeRoot) -> None:  # type: ignore[no-untyped-def]
    """Killed while waiting for confirmation, host reboots, agent comes back: the
    journaled deadline still holds, nobody confirms, so it rolls back code."""
    fleet = make_fleet({"web1": ["web"]})
    old, new = fake.system("old"), fake.system("new")
    fake.install(old)
    agent = nixos_agent(fleet, fake)
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", new, "--confirm", "controller",
                                  "--confirm-timeout", "12", "--no-wait")
    assert rc == 0, out

    def confirm_deadline() -> float | None:
        return next((r["value"] for r in fleet.journal("web1")
                     if r.get("key") == "confirm_deadline"), None)
    deadline = wait_for(confirm_deadline, timeout=20, what="the journaled confirm deadline")
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(10)
    fake.boot()  # the profile says `new`: the host comes back up running it
    assert fake.current == new
    time.sleep(max(0.0, deadline - 2.5 - time.time()))
    nixos_agent(fleet, fake)  # a fresh 12 s would end 9.5 s after the journaled deadline
    result_of(fleet, "web1", "rolled_back", timeout=30)
    assert fake.calls()[-3:] == rollback_calls(fake, old)
    assert fake.profile_target == old and fake.current == old
    journal = fleet.journal("web1")
    began = next(r["t"] for r in journal if r["kind"] == "begin" and r["stage"] == "rollback")
    assert deadline - 0.1 <= began < deadline + 6.0  # slack for a loaded machine
    boots = [r["boot_id"] for r in journal if r["kind"] == "start"]
    assert len(boots) == 2 and boots[1] != boots[0]
    assert sum(1 for r in journal if r.get("stage") == "switch" and r["kind"] == "begin") == 1


def test_e2e_boot_reboots_then_confirms_or_rolls_back(make_fleet, fake: FakeRoot) -> None:  # type: ignore[no-untyped-def]
    """`--action boot --reboot now`: set profile, stc boot, journal, reboot; after boot
    (new boot id) the agent confirms within the journaled deadline or rolls back."""
    fleet = make_fleet({"web1": ["web"]})
    old, new = fake.system("old"), fake.system("new")
    fake.install(old)
    agent = nixos_agent(fleet, fake)
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", new, "--action", "boot",
                                  "--reboot", "now", "--confirm", "controller",
                                  "--confirm-timeout", "8", "--no-wait")
    assert rc == 0, out

    def rebooting_or_finished() -> bool:
        _, rows = fleet.fleetctl_json("status", "web1")
        return ["systemctl", "reboot"] in fake.calls() or rows[0]["result"] is not None
    wait_for(rebooting_or_finished, timeout=20, what="a reboot or a result")
    assert ["systemctl", "reboot"] in fake.calls()
    assert fake.calls()[1:4] == [["nix-env", "-p", str(fake.profile), "--set", new],
                                 activation(new, "boot"), ["switch-to-configuration", "boot"]]
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(10)
    fake.boot()
    nixos_agent(fleet, fake)
    result_of(fleet, "web1", "rolled_back", timeout=30)
    assert fake.calls()[-3:] == rollback_calls(fake, old)


def test_e2e_dry_activate_inhibitors_and_install_bootloader(make_fleet, fake: FakeRoot) -> None:  # type: ignore[no-untyped-def]
    """Issue 12, closer to nixos-rebuild: dry-activate reports and switches nothing; a
    switch refused by switch inhibitors ends `blocked` offering boot, boot default
    unchanged; boot with --install-bootloader sets NIXOS_INSTALL_BOOTLOADER=1."""
    fleet = make_fleet({"web1": ["web"]})
    old, new = fake.system("old"), fake.system("new", inhibited=True)
    plain = fake.system("plain")
    fake.install(old)
    nixos_agent(fleet, fake)
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", plain, "--action",
                                  "dry-activate")
    assert rc == 0 and out["hosts"] == {"web1": "succeeded"}, out
    row = [r for r in fleet.journal("web1") if r["kind"] == "result"][-1]
    assert "would restart the following units: nginx.service" in row["message"]
    assert fake.calls() == [["nix-store", "--realise", plain],
                            activation(plain, "dry-activate"),
                            ["switch-to-configuration", "dry-activate"]]
    assert fake.profile_target == old and fake.current == old
    fake.clear_calls()
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", new)
    assert rc == 1 and out["hosts"] == {"web1": "blocked"}, out
    row = [r for r in fleet.journal("web1") if r["kind"] == "result"][-1]
    assert "refused by switch inhibitors" in row["message"]
    assert "--action boot" in row["message"]
    assert fake.profile_target == old and fake.current == old
    fake.clear_calls()
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", new, "--action", "boot",
                                  "--install-bootloader")
    assert rc == 0 and out["hosts"] == {"web1": "succeeded"}, out
    assert fake.stc_env() == ["1"]
    assert fake.profile_target == new and fake.current == old


def test_e2e_the_agent_restarts_itself_after_a_switch_that_changed_its_unit(  # type: ignore[no-untyped-def]
        make_fleet, fake: FakeRoot) -> None:
    """Issue 12: the switch leaves the agent running (restartIfChanged = false); once the
    deployment's result is recorded the agent has systemd restart it into the new unit,
    and only when its unit changed."""
    fleet = make_fleet({"web1": ["web"]})
    old, new = fake.system("old", agent_unit="v1"), fake.system("new", agent_unit="v2")
    same = fake.system("same", agent_unit="v2")
    fake.install(old)
    nixos_agent(fleet, fake)
    restart = ["systemctl", "--no-block", "restart", "flotilla-agent.service"]
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", new)
    assert rc == 0, out
    wait_for(lambda: restart in fake.calls(), what="the agent's restart")
    calls = fake.calls()
    assert calls.index(restart) > calls.index(["switch-to-configuration", "switch"])
    assert calls.count(restart) == 1
    fake.clear_calls()
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", same)  # unit unchanged
    assert rc == 0, out
    assert fake.current == same and restart not in fake.calls()
    b = NixosBackend(root=fake.root, state_dir=fake.root / "s")
    assert b.agent_unit_changed(old, new) and not b.agent_unit_changed(new, same)
    assert not b.agent_unit_changed(old, fake.system("no-agent"))
