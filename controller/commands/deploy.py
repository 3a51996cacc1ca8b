"""`fleetctl deploy`: plan, publish, watch, summarise."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from controller.build.buildview import add_build_arguments, build_and_push
from controller.build.nixbuild import load_systems
from controller.build.systemref import check_system
from controller.commands import cliutil
from controller.commands.cliutil import parse_choices
from controller.commands.drive import report, run_with_view
from controller.follow.monitor import (
    plural,
)
from controller.rollout.driver import DeployRequest, RolloutDriver
from controller.rollout.planner import RolloutPolicy
from controller.state import store
from controller.state.eventlog import EventLog
from protocol import cliargs
from protocol.errors import InputError, UsageError
from protocol.models import DeployPolicy

ROLLOUT_FLAGS = ("canary", "batch", "max_parallel", "max_failures", "min_executed",
                 "host_timeout", "retries", "pause_between_batches", "confirm_batches",
                 "offline")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("deploy", parents=[common], help="deploy a system to hosts")
    p.add_argument("selector", help="host, @tag or group; comma = union")
    src = p.add_argument_group("what to deploy: --system, --systems or --flake")
    src.add_argument("--system", help="one store path or flake ref for every selected host")
    src.add_argument("--systems", type=Path, metavar="DEPLOY_JSON",
                     help="each host its own store path: {agents: {host: path}, cache, "
                          "cache_public_key} as written by 'fleetctl build'")
    src.add_argument("--build-on", choices=["controller", "host"], default="controller",
                     help="with --flake: build every host's toplevel here and ship it through "
                          "--cache (default), or let each host build the flake itself")
    add_build_arguments(p)
    p.add_argument("--action", choices=["switch", "boot", "test", "dry-activate"],
                   default="switch",
                   help="switch-to-configuration action: switch (now and at boot), boot "
                        "(next boot), test (now, not at boot), dry-activate (fetch, check and "
                        "report what a switch would restart)")
    p.add_argument("--install-bootloader", action="store_true",
                   help="(re)install the boot loader (NIXOS_INSTALL_BOOTLOADER=1)")
    p.add_argument("--timeout", type=cliargs.SECONDS, default=600.0,
                   help="seconds to wait for all hosts")
    p.add_argument("--no-wait", action="store_true", help="return after publishing")
    p.add_argument("--stream", action="store_true",
                   help="with --json: one JSON line per host change (as `watch --json`) "
                        "before the summary line")
    p.add_argument("--check", action="store_true",
                   help="only predict: fetch and run state checks, do not switch (recorded "
                        "as a check; the hosts' status stays as it was)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved hosts, systems, batches and policy; contact "
                        "nothing, record nothing")
    p.add_argument("--choose", action="append", default=[], metavar="STEP.ITEM=CHOICE",
                   help="pre-answer a migration choice (repeatable)")
    p.add_argument("--expires-in", type=cliargs.SECONDS,
                   help="agents ignore the deploy after S seconds")
    g = p.add_argument_group("rollout (defaults from [rollout] in the inventory)")
    g.add_argument("--canary", type=cliargs.COUNT,
                   help="hosts in a first batch that must succeed before the rest start "
                        "(default: [rollout] canary, else 0)")
    g.add_argument("--batch", help="N hosts or P%% per batch")
    g.add_argument("--max-parallel", type=cliargs.AT_LEAST_ONE,
                   help="hosts deploying at once (default: [rollout] max_parallel, else a "
                        "whole batch)")
    g.add_argument("--max-failures", help="N or P%%: abort beyond this")
    g.add_argument("--min-executed", type=cliargs.COUNT,
                   help="hosts finished before judging failures")
    g.add_argument("--host-timeout", type=cliargs.SECONDS, help="per-host in-progress timeout (s)")
    g.add_argument("--retries", type=cliargs.COUNT, help="retries for failed or timed-out hosts")
    g.add_argument("--pause-between-batches", type=cliargs.SECONDS_OR_ZERO,
                   help="seconds to wait after a batch finishes (default: [rollout], else 0)")
    g.add_argument("--confirm-batches", action="store_true", default=None,
                   help="ask before each batch after the first (y/n on a terminal, or "
                        "`fleetctl rollout continue ID`)")
    g.add_argument("--offline", choices=["wait", "skip"],
                   help="hosts offline when their batch starts: wait for them (the retained "
                        "desired state is queued) or skip them (default: [rollout], else "
                        "wait)")
    g.add_argument("--share-group", help="MQTT 5 shared subscription group for events")
    a = p.add_argument_group("on the host")
    a.add_argument("--approval", choices=["none", "ask"], default="none",
                   help="ask: each host waits for `fleetctl approve HOST` before it dumps "
                        "and switches")
    a.add_argument("--confirm", choices=["broker", "controller", "none"], default="broker",
                   help="how the agent proves it still reaches the broker after switching")
    a.add_argument("--confirm-timeout", type=cliargs.SECONDS, default=60.0,
                   help="seconds for that proof; without it the host rolls back")
    a.add_argument("--reboot", default="never", help="never, ask, now or 'window HH:MM-HH:MM'")
    a.add_argument("--prompt-deadline", type=cliargs.SECONDS,
                   help="seconds before a prompt times out")
    a.add_argument("--take-default", action="store_true",
                   help="after the prompt deadline, take each item's default")
    a.add_argument("--on-step-failure", choices=["ask", "retry", "skip", "rollback"],
                   default="ask", help="when a migration fails: ask the operator (a prompt), "
                                       "retry it, skip it, or roll the host back")
    p.set_defaults(func=cmd_deploy)


def rollout_policy(args: argparse.Namespace, defaults: dict[str, Any]) -> RolloutPolicy:
    values = {k.replace("-", "_"): v for k, v in defaults.items()}
    try:  # the inventory's own values first, so an error names its key, not a flag
        RolloutPolicy.from_dict(dict(values))
    except (UsageError, TypeError) as exc:
        text = re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(exc))
        raise InputError(f"{args.inventory}: [rollout] {text}") from None
    for name in ROLLOUT_FLAGS:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    try:
        return RolloutPolicy.from_dict(values)
    except TypeError as exc:
        raise UsageError(f"bad [rollout] option: {exc}") from None


def agent_policy(args: argparse.Namespace) -> DeployPolicy:
    from pydantic import ValidationError
    try:
        return DeployPolicy(
            approval=args.approval, confirm=args.confirm, confirm_timeout_s=args.confirm_timeout,
            reboot=args.reboot, prompt_deadline_s=args.prompt_deadline,
            take_default_on_deadline=args.take_default, on_step_failure=args.on_step_failure)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "option"
        option = "--" + field.removesuffix("_s").replace("_", "-")
        message = first['msg'].removeprefix('Value error, ')
        raise UsageError(f"invalid {option}: {message}") from None


def system_source(args: argparse.Namespace) -> str:
    """Which of --system, --systems, --flake says what to deploy (exactly one)."""
    given = [name for name, v in (("--system", args.system), ("--systems", args.systems))
             if v is not None]
    if not given:
        if not args.flake:
            raise UsageError("say what to deploy: --system PATH|REF, --systems deploy.json "
                             "or --flake REF")
        return "--flake"
    if len(given) > 1:
        raise UsageError("--system and --systems exclude each other")
    return given[0]


def build_request(args: argparse.Namespace) -> DeployRequest:
    source = system_source(args)
    inv = cliutil.inventory(args)
    hosts = inv.resolve(args.selector)
    if not hosts:
        raise UsageError(f"selector {args.selector!r} matches no host")
    if args.install_bootloader and args.action not in ("switch", "boot"):
        raise UsageError("--install-bootloader goes with --action switch or boot")
    system, systems, cache = args.system, {}, None
    if source == "--system":
        system = check_system(args.system)
    elif source == "--systems":
        loaded = load_systems(args.systems)
        systems, cache = loaded.for_hosts(hosts, str(args.systems)), loaded.cache
        system = str(args.systems)
    elif source == "--flake":
        system = args.flake  # --build-on host: each host builds REF#nixosConfigurations.HOST
        if args.build_on == "controller" and not args.cache:
            raise UsageError("deploy --flake builds on the controller: give --cache URL and "
                             "--sign-key FILE to ship the closures to the hosts (or "
                             "--build-on host)")
    return DeployRequest(
        selector=args.selector, hosts=hosts, system=system, action=args.action,
        timeout=args.timeout, choices=parse_choices(args.choose),
        agent_policy=agent_policy(args), rollout=rollout_policy(args, inv.rollout),
        check_only=args.check, expires_in=args.expires_in, systems=systems, cache=cache,
        install_bootloader=args.install_bootloader)


async def build_on_controller(args: argparse.Namespace, req: DeployRequest) -> bool:
    """--flake with --build-on controller: every host's toplevel, pushed to --cache.
    A failed build or push stops the deploy before anything is published."""
    run = await build_and_push(args, req.hosts)
    if not run.ok:
        for host, message in run.failed.items():
            print(f"fleetctl: {host}: build failed: {message}", file=sys.stderr)
        if run.push_message:
            print(f"fleetctl: push failed: {run.push_message}", file=sys.stderr)
        print("fleetctl: nothing was deployed", file=sys.stderr)
        return False
    req.systems, req.cache = run.systems, run.cache
    req.system = f"{args.flake} (per host)"
    return True


async def cmd_deploy(args: argparse.Namespace) -> int:
    req = build_request(args)
    if args.dry_run:
        return dry_run(args, req, EventLog(args.state_dir))
    if system_source(args) == "--flake" and args.build_on == "controller" and \
            not await build_on_controller(args, req):
        return cliutil.EXIT_FAILED
    ctx = cliutil.context(args, need_key=True)
    if not args.json:
        for line in supersede_notes(superseded(ctx.eventlog, req.hosts)):
            print(line, file=sys.stderr)
    driver = RolloutDriver(ctx, req)
    outcome = await run_with_view(args, driver, wait=not args.no_wait)
    return report(args, outcome, check=req.check_only, batches=len(driver.batches))


def superseded(log: EventLog, hosts: list[str]) -> dict[str, list[str]]:
    return store.superseded_by(log.load() if log.exists() else {}, hosts)


def supersede_notes(taken: dict[str, list[str]]) -> list[str]:
    """A note per running rollout this deploy takes hosts from (they end cancelled
    there, superseded), so two operators' rollouts do not cross unseen."""
    return [f"note: {plural(len(hosts), 'host')} of running rollout {rid} "
            f"({', '.join(hosts[:5])}{', ...' if len(hosts) > 5 else ''}) not finished "
            f"there: this deploy supersedes it on them (they end cancelled in {rid})"
            for rid, hosts in taken.items()]


def dry_run(args: argparse.Namespace, req: DeployRequest, log: EventLog) -> int:
    """What `deploy` would do, resolved: contacts nothing, records nothing."""
    batches = req.rollout.batches(req.hosts)
    taken = superseded(log, req.hosts)
    canary = bool(req.rollout.canary)
    listed: list[dict[str, Any]] = [{"batch": i + 1, "canary": i == 0 and canary, "hosts": b}
                                    for i, b in enumerate(batches)]
    plan: dict[str, Any] = {"dry_run": True, "selector": req.selector, "hosts": req.hosts,
            "systems": {h: req.system_for(h) for h in req.hosts}, "action": req.action,
            "check_only": req.check_only,
            "batches": listed,
            "policy": {"rollout": req.rollout.as_dict(),
                       "agent": req.agent_policy.model_dump(), "timeout": req.timeout,
                       "choices": req.choices, "expires_in": req.expires_in},
            "failure_threshold": req.rollout.describe_threshold(),
            "supersedes": taken}
    if args.json:
        cliutil.emit_json(plan)
        return cliutil.EXIT_OK
    what = "check" if req.check_only else req.action
    for line in supersede_notes(taken):
        print(line, file=sys.stderr)
    print(f"dry run: {what} {req.system} on {plural(len(req.hosts), 'host')} matching "
          f"{req.selector!r}; nothing is contacted or recorded")
    for b in listed:
        label = "canary" if b["canary"] else f"batch {b['batch']}"
        print(f"  {label} ({len(b['hosts'])}): {', '.join(b['hosts'])}")
    pol = {k: v for k, v in req.rollout.as_dict().items() if v not in (None, 0, 0.0, False)}
    print("  rollout: " + (", ".join(f"{k}={v}" for k, v in pol.items()) or "defaults")
          + f"; abort beyond {req.rollout.describe_threshold()}; timeout {req.timeout:g}s")
    agent = req.agent_policy.model_dump(exclude_defaults=True)
    print("  on the host: " + (", ".join(f"{k}={v}" for k, v in agent.items()) or "defaults")
          + (f"; pre-answers {req.choices}" if req.choices else ""))
    return cliutil.EXIT_OK
