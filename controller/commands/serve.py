"""`fleetctl serve`: the web dashboard (fleet, rollouts, prompts, live updates)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from controller.commands import cliutil
from controller.state.keys import KEY_NAME, load_key
from controller.web.auth import DEFAULT_LISTEN, Guard, TokenFile, is_loopback, parse_listen
from protocol.errors import UsageError

TOKEN_FILE_NAME = "web-tokens.json"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common],
                       help="web dashboard: the fleet, rollouts and prompts, live")
    s.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to listen on (default {DEFAULT_LISTEN}); any non-loopback "
                        "address needs a token (--new-token)")
    s.add_argument("--token-file", type=Path,
                   help=f"hashed access tokens (default STATE_DIR/{TOKEN_FILE_NAME})")
    s.add_argument("--new-token", metavar="NAME",
                   help="create an access token called NAME, print it once, and exit")
    s.add_argument("--revoke-token", metavar="NAME", help="delete the token NAME and exit")
    s.add_argument("--list-tokens", action="store_true", help="list token names and exit")
    s.set_defaults(func=cmd_serve)


def _token_file(args: argparse.Namespace) -> TokenFile:
    return TokenFile(args.token_file or args.state_dir / TOKEN_FILE_NAME)


def _tokens_command(args: argparse.Namespace, tokens: TokenFile) -> int:
    if args.new_token:
        secret = tokens.add(args.new_token)
        if args.json:
            cliutil.emit_json({"name": args.new_token, "token": secret,
                               "token_file": str(tokens.path)})
        else:
            print(secret)
            print(f"token {args.new_token!r} stored (hashed) in {tokens.path}; it is shown "
                  "only now", file=sys.stderr)
        return cliutil.EXIT_OK
    if args.revoke_token:
        if not tokens.revoke(args.revoke_token):
            raise UsageError(f"no token called {args.revoke_token!r} in {tokens.path}")
        print(f"token {args.revoke_token!r} revoked; its sessions end at their next request",
              file=sys.stderr)
        return cliutil.EXIT_OK
    names = tokens.names()
    if args.json:
        cliutil.emit_json(names)
    else:
        print("\n".join(names) if names else f"no tokens in {tokens.path}")
    return cliutil.EXIT_OK


async def cmd_serve(args: argparse.Namespace) -> int:
    from controller.web.app import serve  # aiohttp and jinja: only for this command

    tokens = _token_file(args)
    if args.new_token or args.revoke_token or args.list_tokens:
        return _tokens_command(args, tokens)
    host, port = parse_listen(args.listen)
    guard = Guard(tokens, loopback_listener=is_loopback(host))
    if guard.tokens_required and not tokens.any():
        raise UsageError(f"--listen {args.listen} is not a loopback address: create an "
                         "access token first (fleetctl serve --new-token NAME)")
    inventory = cliutil.inventory(args)
    ctx = cliutil.context(args)
    if (args.state_dir / KEY_NAME).exists():
        ctx.key = load_key(args.state_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def announce(url: str) -> None:
        need = "token required" if guard.tokens_required else "loopback, no token needed"
        if args.json:
            cliutil.emit_json({"url": url, "tokens_required": guard.tokens_required,
                               "signing": ctx.key is not None})
        else:
            print(f"fleetctl serve: dashboard on {url} ({need}"
                  + ("" if ctx.key else "; no signing key: answers disabled") + ")",
                  file=sys.stderr, flush=True)

    await serve(ctx, inventory, guard, host, port, announce, stop)
    return cliutil.EXIT_OK
