"""`fleetctl prompts`, `fleetctl answer`, `fleetctl rollback`: the state-step commands."""

from __future__ import annotations

import argparse
import getpass
import socket
from typing import Any

from rich.console import Console

from controller.commands import cliutil
from controller.commands.cliutil import parse_choices
from controller.rollout.answers import open_prompts, prompt_row, send_answer, send_cancel
from protocol import cliargs
from protocol.errors import InputError, UsageError
from protocol.prompts import APPROVE_KEY, DEFERRALS
from protocol.topics import validate_host


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("prompts", parents=[common], help="list open prompts")
    p.add_argument("selector", nargs="?")
    p.set_defaults(func=cmd_prompts)
    a = sub.add_parser("answer", parents=[common], help="answer a host's prompt (signed)")
    a.add_argument("host")
    a.add_argument("prompt_id", nargs="?", metavar="PROMPT_ID",
                   help="the prompt answered (`fleetctl prompts` lists them); left out: the "
                        "host's open prompt")
    a.add_argument("choices", nargs="*", metavar="STEP.ITEM=CHOICE")
    a.add_argument("--approve", action="store_true", help="approve a deploy waiting for it")
    a.set_defaults(func=cmd_answer)
    r = sub.add_parser("approve", parents=[common],
                       help="approve deploys waiting for approval (or start their pending "
                            "reboot now); --defer puts an approval off instead")
    r.add_argument("selector")
    r.add_argument("--defer", choices=DEFERRALS,
                   help="not now: defer-1h, defer-tonight (the host's evening time) or "
                        "defer-tomorrow; the deploy proceeds by itself then")
    r.set_defaults(func=cmd_approve)
    c = sub.add_parser("cancel", parents=[common],
                       help="withdraw the hosts' pending desired state and end their "
                            "deployment's wait (approval, choice, reboot); signed")
    c.add_argument("selector")
    c.add_argument("--reason", default="", help="recorded with the cancellation")
    c.set_defaults(func=cmd_cancel)
    b = sub.add_parser("rollback", parents=[common],
                       help="undo each host's last deployment: restore its dumps, then the "
                            "previous generation")
    b.add_argument("selector")
    b.add_argument("--timeout", type=cliargs.SECONDS, default=600.0,
                   help="seconds to wait for all hosts")
    b.add_argument("--batch", help="N hosts or P%% per batch")
    b.add_argument("--max-parallel", type=cliargs.AT_LEAST_ONE, help="hosts rolling back at once "
                   "(default: a whole batch)")
    b.set_defaults(func=cmd_rollback)


def _answered_by() -> str:
    try:
        return f"fleetctl:{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return f"fleetctl:?@{socket.gethostname()}"


def answer_command(row: dict[str, Any]) -> str:
    """The command that answers a listed prompt (approval prompts: `fleetctl approve`)."""
    host, pid = row["host"], row["prompt_id"]
    if row["kind"] == "approval":
        return f"fleetctl approve {host}"
    pairs = " ".join(f"{i['step']}.{i['id']}={'|'.join(c['id'] for c in i['choices'])}"
                     for i in row["items"] if i["choices"])
    return f"fleetctl answer {host} {pid} {pairs or 'STEP.ITEM=CHOICE ...'}"


async def cmd_prompts(args: argparse.Namespace) -> int:
    inv = cliutil.inventory(args)
    hosts = inv.resolve(args.selector) if args.selector else list(inv.hosts)
    prompts = await open_prompts(cliutil.context(args), hosts)
    rows: list[dict[str, Any]] = [prompt_row(h, p) for h, p in sorted(prompts.items())]
    if args.json:
        cliutil.emit_json(rows)
        return cliutil.EXIT_OK
    console = Console()
    if not rows:
        console.print("no open prompts")
    for row in rows:
        console.print(f"[bold]{row['host']}[/] prompt [cyan]{row['prompt_id']}[/] ({row['kind']})")
        for item in row["items"]:
            console.print(f"  {item['step']}.{item['id']}: {item['message']}")
            for c in item["choices"]:
                console.print(choice_line(c, item["default"]))
        console.print(f"  answer: {answer_command(row)}", markup=False)
    return cliutil.EXIT_OK


def choice_line(choice: dict[str, Any], default: str | None) -> str:
    """One choice of `fleetctl prompts` (rich markup): id, label — description, marks."""
    mark = " [red](destructive)[/]" if choice["destructive"] else ""
    dflt = " [green](default)[/]" if choice["id"] == default else ""
    text = " — ".join(x for x in (choice["label"], choice["description"]) if x)
    return f"    - {choice['id']}{': ' + text if text else ''}{mark}{dflt}"


async def cmd_answer(args: argparse.Namespace) -> int:
    validate_host(args.host)
    if args.host not in cliutil.inventory(args).hosts:
        raise InputError(f"unknown host {args.host!r} (not in the inventory)")
    if args.prompt_id is not None and "=" in args.prompt_id:  # an answer: no prompt id given
        args.choices, args.prompt_id = [args.prompt_id, *args.choices], None
    choices = parse_choices(args.choices, "an answer")
    if not choices and not args.approve:
        raise UsageError("give at least one STEP.ITEM=CHOICE (or --approve)")
    ctx = cliutil.context(args, need_key=True)
    if args.prompt_id is None:
        prompt = (await open_prompts(ctx, [args.host])).get(args.host)
        if prompt is None:
            raise InputError(f"{args.host} has no open prompt to answer (`fleetctl prompts` "
                             "lists the open ones)")
        args.prompt_id = prompt.prompt_id
    ok, message = await send_answer(ctx, args.host, args.prompt_id, choices, args.approve,
                                    _answered_by())
    if args.json:
        cliutil.emit_json({"host": args.host, "prompt_id": args.prompt_id, "accepted": ok,
                           "message": message})
    else:
        print(f"{args.host}: {message}")
    return cliutil.EXIT_OK if ok else cliutil.EXIT_FAILED


async def cmd_approve(args: argparse.Namespace) -> int:
    hosts = cliutil.inventory(args).resolve(args.selector)
    ctx = cliutil.context(args, need_key=True)
    kinds = ("approval",) if args.defer else ("approval", "reboot")
    prompts = {h: p for h, p in (await open_prompts(ctx, hosts)).items() if p.kind in kinds}
    results = {}
    for host, prompt in sorted(prompts.items()):
        if args.defer:
            results[host] = await send_answer(ctx, host, prompt.prompt_id,
                                              {APPROVE_KEY: args.defer}, False, _answered_by())
        else:
            results[host] = await send_answer(ctx, host, prompt.prompt_id, {}, True,
                                              _answered_by())
    if args.json:
        cliutil.emit_json({h: {"accepted": ok, "message": m} for h, (ok, m) in results.items()})
    else:
        if not results:
            print("no host is waiting for approval" + ("" if args.defer else " or a reboot"))
        for h, (_ok, m) in results.items():
            print(f"{h}: {m}")
    return cliutil.EXIT_OK if all(ok for ok, _ in results.values()) else cliutil.EXIT_FAILED


async def cmd_cancel(args: argparse.Namespace) -> int:
    hosts = cliutil.inventory(args).resolve(args.selector)
    await send_cancel(cliutil.context(args, need_key=True), hosts, args.reason, _answered_by())
    if args.json:
        cliutil.emit_json({"cancelled": hosts})
    else:
        for host in hosts:
            print(f"{host}: desired state withdrawn, cancel sent")
    return cliutil.EXIT_OK


async def cmd_rollback(args: argparse.Namespace) -> int:
    """A rollout whose desired states say `rollback`: same batches, journal and view."""
    from controller.commands.drive import report, run_with_view
    from controller.rollout.driver import DeployRequest, RolloutDriver
    from controller.rollout.planner import RolloutPolicy

    hosts = cliutil.inventory(args).resolve(args.selector)
    req = DeployRequest(selector=args.selector, hosts=hosts, system="rollback",
                        timeout=args.timeout, rollback=True,
                        rollout=RolloutPolicy(batch=args.batch, max_parallel=args.max_parallel))
    driver = RolloutDriver(cliutil.context(args, need_key=True), req)
    outcome = await run_with_view(args, driver, wait=True)
    return report(args, outcome)
