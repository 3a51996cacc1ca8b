"""The simulated host's starting system (`fleet-agent simulate --sim-system`)."""

from __future__ import annotations

from pathlib import Path

from client.host.sim import SimSettings, SimulatedBackend


async def test_a_new_host_runs_the_given_system_and_a_restart_keeps_what_it_got(
        tmp_path: Path) -> None:
    settings = SimSettings(system="/nix/store/v1")
    host = SimulatedBackend(tmp_path, "h1", settings)
    assert host.current_system() == "/nix/store/v1"

    async def progress(message: str) -> None:
        pass

    await host.switch("/nix/store/v2", "switch", progress)
    again = SimulatedBackend(tmp_path, "h1", settings)  # the agent restarted
    assert again.current_system() == "/nix/store/v2"  # not reset to --sim-system
    await again.rollback("/nix/store/v1", progress)
    assert again.current_system() == "/nix/store/v1"


def test_without_a_system_a_new_host_runs_none(tmp_path: Path) -> None:
    assert SimulatedBackend(tmp_path, "h1").current_system() is None
