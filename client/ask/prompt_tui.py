"""`fleet-agent prompt`: answer this host's open prompts from a terminal or a script.

Talks to the agent over its control socket (`STATE_DIR/control.sock`). Interactive:
lists each open item with its choices and descriptions, marks destructive ones,
preselects the default (Enter takes it), shows the deadline, asks for confirmation
(typing "yes" when a destructive choice is included) and sends the answer.
Scripted: `--answer PROMPT_ID STEP.ITEM=CHOICE ...` or `--approve` print one line.

Exit status: 0 accepted (or nothing to answer), 1 refused or cancelled,
2 usage error, 3 the agent cannot be reached. Never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from client.ask.control import ControlClient, ControlError, socket_path
from protocol import cliargs
from protocol.models import Prompt, ReportItem
from protocol.prompts import DEFERRALS

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_STATE_DIR = Path("/var/lib/flotilla")
Ask = Callable[[str], str]


class Usage(Exception):
    """A mistake in the command line (exit 2)."""


class Cancelled(Exception):
    """The person backed out (exit 1)."""


def outcome_line(ok: bool, message: str) -> str:
    """`accepted` (or `accepted; still open: …`), `refused: why`; never `accepted: accepted`."""
    word = "accepted" if ok else "refused"
    if message == word or message.startswith(word):
        return message
    return f"{word}: {message}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=cliargs.path, default=DEFAULT_STATE_DIR,
                   help="the agent's state directory (holds control.sock)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--answer", nargs="+", metavar="ARG",
                      help="PROMPT_ID STEP.ITEM=CHOICE ...: answer without asking")
    mode.add_argument("--approve", action="store_true",
                      help="approve the deploy that waits for approval (or start its pending "
                           "reboot now), without asking")
    mode.add_argument("--defer", choices=DEFERRALS,
                      help="not now: put the approval off (defer-1h, defer-tonight, "
                           "defer-tomorrow); the deploy proceeds by itself then")


# -- pure helpers -------------------------------------------------------------------------

def parse_pairs(args: list[str]) -> tuple[str, dict[str, str]]:
    """`PROMPT_ID ITEM=CHOICE ...` -> (prompt_id, {ITEM: CHOICE})."""
    if len(args) < 2:
        raise Usage("--answer needs PROMPT_ID and at least one STEP.ITEM=CHOICE")
    prompt_id, pairs = args[0], args[1:]
    if "=" in prompt_id:
        raise Usage(f"--answer: the first argument is the prompt id, got {prompt_id!r}")
    choices: dict[str, str] = {}
    for pair in pairs:
        key, sep, choice = pair.partition("=")
        if not sep or not key or not choice:
            raise Usage(f"--answer: expected STEP.ITEM=CHOICE, got {pair!r}")
        if key in choices and choices[key] != choice:
            raise Usage(f"--answer: {key} is given twice")
        choices[key] = choice
    return prompt_id, choices


def check_answer(prompts: list[Prompt], prompt_id: str, choices: dict[str, str]) -> str | None:
    """Why the agent would refuse this answer, or None if it names real items and choices."""
    prompt = next((p for p in prompts if p.prompt_id == prompt_id), None)
    if prompt is None:
        open_ids = ", ".join(p.prompt_id for p in prompts) or "none"
        return f"no open prompt {prompt_id} (open: {open_ids})"
    items = {i.key: i for i in prompt.items if i.choices}
    for key, choice in choices.items():
        item = items.get(key)
        if item is None:
            return f"prompt {prompt_id} has no open item {key} (items: {', '.join(items)})"
        ids = [c.id for c in item.choices]
        if choice not in ids:
            return f"{key} has no choice {choice} (choices: {', '.join(ids)})"
    return None


def _duration(seconds: float) -> str:
    seconds = int(abs(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def deadline_line(prompt: Prompt, now: float) -> str | None:
    if prompt.deadline is None:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(prompt.deadline))
    left = prompt.deadline - now
    rel = f"in {_duration(left)}" if left > 0 else f"passed {_duration(left)} ago"
    return f"Deadline: {when} ({rel}); then the deploy's policy may take the defaults."


def render_item(index: int, total: int, item: ReportItem) -> list[str]:
    lines = [f"[{index}/{total}] {item.key} ({item.severity}): {item.message}"]
    for n, c in enumerate(item.choices, 1):
        marks = []
        if c.id == item.default:
            marks.append("default")
        tag = f" ({', '.join(marks)})" if marks else ""
        danger = "  [DESTRUCTIVE]" if c.destructive else ""
        label = f" - {c.label}" if c.label and c.label != c.id else ""
        lines.append(f"  {n}) {c.id}{label}{tag}{danger}")
        if c.description:
            lines.append(f"       {c.description}")
    return lines


def render_header(prompt: Prompt, now: float) -> list[str]:
    lines = [f"Host {prompt.host}: prompt {prompt.prompt_id} ({prompt.kind}) for deployment"
             f" {prompt.deployment_id}, generation {prompt.generation}"]
    dl = deadline_line(prompt, now)
    if dl:
        lines.append(dl)
    for item in prompt.items:
        if not item.choices:
            lines.append(f"  note {item.key} ({item.severity}): {item.message}")
    return lines


def pick_choice(item: ReportItem, reply: str) -> str | None:
    """A reply (number, choice id, or empty for the default) -> choice id, or None."""
    reply = reply.strip()
    if not reply:
        return item.default
    if reply.isdigit() and 1 <= int(reply) <= len(item.choices):
        return item.choices[int(reply) - 1].id
    for c in item.choices:
        if reply == c.id:
            return c.id
    return None


def is_destructive(prompt: Prompt, choices: dict[str, str]) -> list[str]:
    out = []
    for item in prompt.items:
        chosen = choices.get(item.key)
        for c in item.choices:
            if c.id == chosen and c.destructive:
                out.append(f"{item.key}={c.id}")
    return out


# -- interaction --------------------------------------------------------------------------

def choose(prompt: Prompt, ask: Ask, say: Callable[[str], None], now: float) -> dict[str, str]:
    """Ask for every open item; return the choices confirmed by the person."""
    for line in render_header(prompt, now):
        say(line)
    open_items = [i for i in prompt.items if i.choices]
    choices: dict[str, str] = {}
    for n, item in enumerate(open_items, 1):
        say("")
        for line in render_item(n, len(open_items), item):
            say(line)
        hint = f" [Enter = {item.default}]" if item.default else ""
        while True:
            picked = pick_choice(item, ask(f"Choice for {item.key}{hint}: "))
            if picked is not None:
                break
            say(f"  please type a number 1-{len(item.choices)} or a choice id")
        choices[item.key] = picked
    say("")
    say("You chose:")
    for key, choice in choices.items():
        say(f"  {key} = {choice}")
    danger = is_destructive(prompt, choices)
    if danger:
        say("This includes DESTRUCTIVE choices: " + ", ".join(danger))
        if ask("Type 'yes' to send these answers: ").strip().lower() != "yes":
            raise Cancelled
    elif ask("Send these answers? [y/N] ").strip().lower() not in ("y", "yes"):
        raise Cancelled
    return choices


def _select_prompt(prompts: list[Prompt], ask: Ask, say: Callable[[str], None]) -> Prompt:
    if len(prompts) == 1:
        return prompts[0]
    say("Open prompts:")
    for n, p in enumerate(prompts, 1):
        say(f"  {n}) {p.prompt_id} ({p.kind}) deployment {p.deployment_id}")
    while True:
        reply = ask(f"Which prompt [1-{len(prompts)}]: ").strip()
        if reply.isdigit() and 1 <= int(reply) <= len(prompts):
            return prompts[int(reply) - 1]


def interactive(client: ControlClient, ask: Ask, say: Callable[[str], None]) -> int:
    prompts = client.list_prompts()
    if not prompts:
        state = client.status()
        say(f"No open prompts on {state.host} (phase: {state.phase}).")
        return EXIT_OK
    prompt = _select_prompt(prompts, ask, say)
    if prompt.kind != "approval" and not any(i.choices for i in prompt.items):
        for line in render_header(prompt, time.time()):
            say(line)
        say("This prompt has nothing to choose from here.")
        return EXIT_REFUSED
    if prompt.kind == "approval":
        for line in render_header(prompt, time.time()):
            say(line)
        item = prompt.items[0] if prompt.items else None
        if item is not None and len(item.choices) > 1:  # approve, or "not now"
            say("")
            for line in render_item(1, 1, item):
                say(line)
            while True:
                picked = pick_choice(item, ask("Approve now or when? [number or id]: "))
                if picked is not None:
                    break
                say(f"  please type a number 1-{len(item.choices)} or a choice id")
            ok, message = client.approve(None if picked == "approve" else picked)
            say(outcome_line(ok, message))
            return EXIT_OK if ok else EXIT_REFUSED
        if ask(f"Approve deployment {prompt.deployment_id}? [y/N] ").strip().lower() not in (
                "y", "yes"):
            raise Cancelled
        ok, message = client.approve()
    else:
        choices = choose(prompt, ask, say, time.time())
        ok, message = client.answer(prompt.prompt_id, choices)
    say(outcome_line(ok, message))
    return EXIT_OK if ok else EXIT_REFUSED


def scripted_answer(client: ControlClient, args: list[str], say: Callable[[str], None]) -> int:
    prompt_id, choices = parse_pairs(args)
    problem = check_answer(client.list_prompts(), prompt_id, choices)
    if problem is not None:
        say(f"refused: {problem}")
        return EXIT_REFUSED
    ok, message = client.answer(prompt_id, choices)
    say(outcome_line(ok, message))
    return EXIT_OK if ok else EXIT_REFUSED


def run(args: argparse.Namespace, stdin: TextIO | None = None,
        stdout: TextIO | None = None) -> int:
    """Entry point of `fleet-agent prompt` (after argparse)."""
    inp = stdin or sys.stdin
    out = stdout or sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    def ask(question: str) -> str:
        out.write(question)
        out.flush()
        line = inp.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    client = ControlClient(socket_path(args.state_dir))
    try:
        if args.answer is not None:
            return scripted_answer(client, args.answer, say)
        if args.approve or args.defer:
            ok, message = client.approve(args.defer)
            say(outcome_line(ok, message))
            return EXIT_OK if ok else EXIT_REFUSED
        if not inp.isatty():
            raise Usage("stdin is not a terminal; use --answer PROMPT_ID STEP.ITEM=CHOICE ..."
                        " or --approve")
        return interactive(client, ask, say)
    except Usage as exc:
        print(f"fleet-agent prompt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"fleet-agent prompt: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (Cancelled, EOFError):
        say("cancelled: nothing was sent")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        say("\ncancelled: nothing was sent")
        return 130
