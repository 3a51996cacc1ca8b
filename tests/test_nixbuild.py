"""Issue 12, pure parts: deploy.json, Nix keys, `nix build --json`, fetch refusals, and
the command line refusing bad input with one line and exit 2 before anything runs."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from controller.build.nixbuild import SystemsFile, parse_systems, push_commands
from controller.cli import main
from protocol.errors import InputError
from protocol.models import BinaryCache
from protocol.nixref import (
    explain_fetch_failure,
    out_path_of_build,
    public_key_of_secret,
    toplevel_installable,
)

P1 = "/nix/store/" + "a" * 32 + "-nixos-system-web1"
P2 = "/nix/store/" + "b" * 32 + "-nixos-system-web2"
SECRET = base64.b64encode(bytes(range(64))).decode()
PUBLIC = "k-1:" + base64.b64encode(bytes(range(32, 64))).decode()
CACHE = BinaryCache(url="file:///srv/cache", public_key=PUBLIC)


@pytest.mark.parametrize(("text", "expected"), [
    (json.dumps({"agents": {"web1": P1, "web2": P2}}), SystemsFile({"web1": P1, "web2": P2})),
    (json.dumps({"agents": {"web1": P1}, "cache": "file:///srv/cache",
                 "cache_public_key": PUBLIC}), SystemsFile({"web1": P1}, CACHE)),
])
def test_parse_systems(text: str, expected: SystemsFile) -> None:
    assert parse_systems(text, "deploy.json") == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("{", "not JSON"),
    ("[]", '{"agents"'),
    (json.dumps({"agents": {"web1": 3}}), '{"agents"'),
    (json.dumps({"agents": {"Web_1": P1}}), "invalid host name 'Web_1'"),
    (json.dumps({"agents": {"web1": P1}, "cache": "file:///c"}), "needs \"cache_public_key\""),
    (json.dumps({"agents": {"web1": P1}, "cache": "file:///c", "cache_public_key": "nokey"}),
     "needs \"cache_public_key\""),
    (json.dumps({"agents": {"web1": P1}, "cache": "not a url", "cache_public_key": PUBLIC}),
     "a store URL"),
])
def test_parse_systems_refuses_bad_files(text: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment) as exc:
        parse_systems(text, "deploy.json")
    assert str(exc.value).startswith("deploy.json: ") and "\n" not in str(exc.value)


def test_selected_hosts_missing_from_the_file_are_named_extra_ones_ignored() -> None:
    f = SystemsFile({"web1": P1, "web2": P2, "db9": P2})
    assert f.for_hosts(["web1", "web2"], "d.json") == {"web1": P1, "web2": P2}
    with pytest.raises(InputError, match=r"^d.json has no system for web3, web4 \(it lists "
                                         r"db9, web1, web2\)$"):
        f.for_hosts(["web1", "web3", "web4"], "d.json")


def test_public_key_of_a_nix_signing_key() -> None:
    assert public_key_of_secret(f"k-1:{SECRET}\n") == PUBLIC
    for bad in ("", "k-1", f":{SECRET}", "k-1:" + base64.b64encode(b"short").decode(),
                "k-1:not base64!"):
        with pytest.raises(InputError, match="is not a Nix signing key"):
            public_key_of_secret(bad, "key.sec")


@pytest.mark.parametrize(("stdout", "expected"), [
    (json.dumps([{"drvPath": "/nix/store/x.drv", "outputs": {"out": P1}}]), P1),  # 2.8 & now
    ("", None), ("not json", None), ("[]", None), (json.dumps([{"outputs": {}}]), None),
    (json.dumps({"outputs": {"out": P1}}), None),
])
def test_out_path_of_nix_build_json(stdout: str, expected: str | None) -> None:
    assert out_path_of_build(stdout) == expected


@pytest.mark.parametrize(("tail", "fragment"), [
    (["error: hash mismatch importing path '/nix/store/x';", "  specified: sha256:1"],
     "its NAR does not match the signed hash (tampered or corrupt)"),
    (["error: cannot add path '/nix/store/x' because it lacks a valid signature"],
     "not signed by the trusted cache key k-1"),
    (["warning: the substitute for '/nix/store/x' from 'file:///c' is not signed by any of "
      "the keys in 'trusted-public-keys'"], "not signed by the trusted cache key k-1"),
])
def test_fetch_refusals_are_explained(tail: list[str], fragment: str) -> None:
    msg = explain_fetch_failure(P1, CACHE, tail)
    assert msg is not None and fragment in msg and "nothing was switched" in msg
    assert explain_fetch_failure(P1, CACHE, ["error: unable to download"]) is None


def test_push_signs_the_closures_then_copies_them() -> None:
    assert push_commands([P1, P2], CACHE, Path("/k.sec")) == [
        ["nix", "--extra-experimental-features", "nix-command flakes", "store", "sign",
         "--key-file", "/k.sec", "--recursive", P1, P2],
        ["nix", "--extra-experimental-features", "nix-command flakes", "copy", "--to",
         "file:///srv/cache", P1, P2]]
    assert toplevel_installable("path:/f", "1web") == \
        'path:/f#nixosConfigurations."1web".config.system.build.toplevel'


def fleetctl(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """fleetctl's main() in this process (the same code path as the command, faster)."""
    inv = tmp_path / "fleet.toml"
    inv.write_text('[hosts.web1]\ntags = ["web"]\n[hosts.web2]\ntags = ["web"]\n')
    capsys.readouterr()
    try:
        rc = main([*args, "--inventory", str(inv), "--state-dir", str(tmp_path / "state")])
    except SystemExit as exc:  # argparse errors
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(("args", "fragment"), [
    (["deploy", "@web"], "say what to deploy: --system PATH|REF, --systems deploy.json or "
                         "--flake REF"),
    (["deploy", "@web", "--system", P1, "--systems", "d.json"], "exclude each other"),
    (["deploy", "@web", "--systems", "/nonexistent/d.json"], "cannot read /nonexistent/d.json"),
    (["deploy", "@web", "--flake", "path:/x", "--cache", "file:///c"], "--cache needs "
                                                                        "--sign-key"),
    (["build", "@web"], "build needs --flake REF"),
    (["deploy", "@web", "--flake", "path:/x"], "give --cache URL and --sign-key FILE"),
    (["build", "@web", "--flake", "path:/x", "--cache", "file:///c", "--sign-key",
      "/nonexistent.sec"], "cannot read signing key /nonexistent.sec"),
    (["deploy", "@web", "--system", P1, "--action", "test", "--install-bootloader"],
     "--install-bootloader goes with --action switch or boot"),
])
def test_bad_build_and_deploy_input_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        fragment: str) -> None:
    rc, err = fleetctl(tmp_path, capsys, *args)
    assert rc == 2, err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "state" / "state.jsonl").exists()


def test_a_resumed_rollout_keeps_each_host_its_system_and_the_cache(tmp_path: Path) -> None:
    """`fleetctl rollout resume` rebuilds the request from the event log: per-host paths,
    the cache and the boot-loader flag must survive, or a resumed batch would get the
    wrong system."""
    from controller.rollout.driver import ControllerContext, DeployRequest, RolloutDriver
    from protocol.broker import BrokerCluster
    from protocol.topics import Topics

    ctx = ControllerContext(broker=BrokerCluster.parse("mqtt://127.0.0.1:1"),
                            topics=Topics("t/v1"), state_dir=tmp_path)
    req = DeployRequest(selector="@web", hosts=["web1", "web2"], system="deploy.json",
                        systems={"web1": P1, "web2": P2}, cache=CACHE, action="boot",
                        install_bootloader=True)
    driver = RolloutDriver(ctx, req)
    driver.create()
    back = RolloutDriver.from_log(ctx, driver.rollout_id).req
    assert (back.systems, back.cache, back.install_bootloader) == (req.systems, CACHE, True)
    assert [back.system_for(h) for h in ("web1", "web2")] == [P1, P2]
