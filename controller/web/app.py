"""The dashboard's HTTP side (aiohttp): pages, actions, the JSON API and live streams.

Pages are rendered on the server from `controller.web.pages` data with Jinja templates
(autoescaped). Each page has a stream (`/stream/...`, Server-Sent Events) that sends the
page's fragments again whenever the feed changes, only those whose HTML changed; the
page's script swaps them in by element id. `/api/events` is the same for programs: JSON
host and rollout rows as they change.

Actions (answer, approve, abort, continue) are POSTs that need the session's CSRF
token; answers are signed with the controller key by `controller.rollout.answers`, exactly as
`fleetctl answer` signs them, and name `web:<token name>` as who answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from controller.rollout import steer as rollout_ops
from controller.rollout.answers import check_choices, destructive_choices, send_answer, send_cancel
from controller.rollout.driver import ControllerContext
from controller.state import store
from controller.state.inventory import Inventory
from controller.web import pages
from controller.web.auth import SESSION_COOKIE, Guard, Identity, is_loopback
from controller.web.feed import Feed, HostLive
from protocol.errors import (
    BrokerUnavailable,
    FlotillaError,
    InputError,
    StateError,
    UnknownRolloutError,
    UsageError,
)
from protocol.mqtt import cancel_and_wait

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
COALESCE_S = 0.03
KEEPALIVE_S = 15.0
FLASH_TTL_S = 120.0
IDENTITY = web.RequestKey("identity", Identity)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Fragments = tuple[dict[str, str], dict[str, list[str]]]
# errors that are no bad request (400): naming nothing there is, or the server's trouble
ERROR_STATUS: tuple[tuple[type[FlotillaError], int], ...] = (
    (UnknownRolloutError, 404), (BrokerUnavailable, 503), (StateError, 503))

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
                    "Cache-Control": "no-store"}


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _hms(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


def _css(value: object) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(value or "none"))


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, trim_blocks=False, lstrip_blocks=False)
    env.filters.update(clock=_clock, hms=_hms, duration=_duration, css=_css,
                       shortsys=pages.short_system)
    return env


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Dashboard:
    def __init__(self, ctx: ControllerContext, inventory: Inventory, feed: Feed,
                 guard: Guard) -> None:
        self.ctx = ctx
        self.inventory = inventory
        self.feed = feed
        self.guard = guard
        self.env = templates()
        self.m: Any = self.env.get_template("macros.html").module
        self._flash: dict[str, tuple[float, str, str]] = {}
        self._rows: dict[str, tuple[int, dict[str, Any], str]] = {}

    # -- the application -----------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers, self._errors, self._security])
        r = app.router
        r.add_get("/", self.fleet_page)
        r.add_get("/hosts/{host}", self.host_page)
        r.add_post("/hosts/{host}/answer", self.answer)
        r.add_post("/hosts/{host}/approve", self.approve)
        r.add_post("/hosts/{host}/cancel", self.cancel_host)
        r.add_get("/rollouts", self.rollouts_page)
        r.add_get("/rollouts/{id}", self.rollout_page)
        r.add_post("/rollouts/{id}/abort", self.abort)
        r.add_post("/rollouts/{id}/continue", self.cont)
        r.add_post("/rollouts/{id}/cancel", self.cancel_rollout)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/stream/fleet", self.fleet_stream)
        r.add_get("/stream/hosts/{host}", self.host_stream)
        r.add_get("/stream/rollouts", self.rollouts_stream)
        r.add_get("/stream/rollouts/{id}", self.rollout_stream)
        r.add_get("/api/hosts", self.api_hosts)
        r.add_get("/api/prompts", self.api_prompts)
        r.add_get("/api/rollouts", self.api_rollouts)
        r.add_get("/api/rollouts/{id}", self.api_rollout)
        r.add_get("/api/events", self.api_events)
        r.add_static("/static", HERE / "static", show_index=False)
        return app

    # -- middleware: headers, errors, who, CSRF ------------------------------------
    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if not response.prepared:  # streams send theirs when they start
            for k, v in SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
        return response

    @web.middleware
    async def _security(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            allowed = self._host_allowed(request)
            ident = self.guard.identify(request.headers.get("Authorization"),
                                        request.cookies.get(SESSION_COOKIE))
        except FlotillaError as exc:  # the token file: let nobody in, say why
            log.error("refused %s %s: %s", request.method, request.path, exc)
            return self._refuse(request, 503, str(exc))
        if not allowed:
            return self._refuse(request, 421, "this dashboard answers only to its own "
                                "address (Host header refused)")
        public = request.path.startswith("/static/") or request.path == "/login"
        if ident is None and not public:
            if request.headers.get("Authorization"):
                return self._refuse(request, 401, "invalid token")
            if self._wants_json(request) or request.method != "GET":
                return self._refuse(request, 401, "sign in first (a bearer token or the "
                                    "login form)")
            raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='')}")
        if ident is not None:
            request[IDENTITY] = ident
        unrouted = request.match_info.http_exception  # no such page, or a wrong method
        if unrouted is not None:
            return self._http_error(request, unrouted)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            problem = await self._csrf_problem(request, ident)
            if problem:
                log.warning("refused %s %s: %s", request.method, request.path, problem)
                return self._refuse(request, 403, problem)
        return await handler(request)

    def _host_allowed(self, request: web.Request) -> bool:
        """Without tokens (loopback only) the Host must be a loopback name: a page on
        another site whose name resolves to 127.0.0.1 (DNS rebinding) is refused."""
        if self.guard.tokens_required:
            return True
        host = urlsplit(f"//{request.host}").hostname or ""
        return is_loopback(host)

    async def _csrf_problem(self, request: web.Request, ident: Identity | None) -> str | None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != self._origin(request):
            return f"cross-site request refused (Origin {origin})"
        if ident is not None and ident.bearer:
            return None
        form = await _form(request)
        given = form.get("csrf")
        session = ident.session if ident is not None else "login"
        if not isinstance(given, str) or not self.guard.csrf_ok(session, given):
            return "missing or invalid CSRF token: reload the page and try again"
        return None

    @staticmethod
    def _origin(request: web.Request) -> str:
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
        return f"{scheme}://{request.host}"

    @staticmethod
    def _wants_json(request: web.Request) -> bool:
        return request.path.startswith(("/api/", "/stream/")) or \
            "application/json" in request.headers.get("Accept", "")

    def _refuse(self, request: web.Request, status: int, message: str,
                title: str | None = None, back: str | None = None) -> web.Response:
        if self._wants_json(request):
            resp = web.json_response({"error": message}, status=status)
        else:
            resp = self._html(request, "error.html", status=status,
                              title=title or f"{status} refused", message=message, back=back)
        if status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="flotilla"'
        return resp

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:  # a redirect
                raise
            return self._http_error(request, exc)
        except FlotillaError as exc:
            status = next((code for kind, code in ERROR_STATUS if isinstance(exc, kind)), 400)
            log.log(logging.WARNING if status >= 500 else logging.INFO,
                    "refused %s %s: %d %s", request.method, request.path, status, exc)
            return self._refuse(request, status, str(exc), title="Not done",
                                back=request.headers.get("Referer"))

    def _http_error(self, request: web.Request, exc: web.HTTPException) -> web.Response:
        """aiohttp's own errors (no such route, wrong method, body too large, an
        unknown host) in the dashboard's form: JSON for the API, else the error page."""
        if isinstance(exc, web.HTTPMethodNotAllowed):
            message = (f"{request.method} is not allowed on {request.path} (allowed: "
                       f"{', '.join(sorted(exc.allowed_methods))})")
        else:
            message = " ".join((exc.text or exc.reason).split())
        log.info("refused %s %s: %d %s", request.method, request.path, exc.status, message)
        resp = self._refuse(request, exc.status, message)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp

    # -- rendering -------------------------------------------------------------------
    def _csrf(self, request: web.Request) -> str:
        ident = request.get(IDENTITY)
        return self.guard.csrf_token(ident.session if ident is not None else "login")

    def _html(self, request: web.Request, template: str, status: int = 200,
              **context: Any) -> web.Response:
        ident = request.get(IDENTITY)
        flash = self._pop_flash(request.query.get("flash"))
        base = {"csrf": self._csrf(request), "identity": ident.name if ident else None,
                "logout": ident is not None and ident.session.startswith("session:"),
                "problems": self._problems(), "stream": None, "notice": flash}
        body = self.env.get_template(template).render(**{**base, **context})
        return web.Response(text=body, status=status, content_type="text/html")

    def _problems(self) -> list[str]:
        """What the banner says: the broker unreachable, the event log unreadable."""
        broker = None if self.feed.connected else self.feed.error or "connecting to the broker…"
        return [p for p in (broker, self.feed.log_error) if p]

    def _flash_url(self, path: str, kind: str, text: str) -> str:
        now = time.time()
        self._flash = {k: v for k, v in self._flash.items() if v[0] > now}
        key = secrets.token_urlsafe(8)
        self._flash[key] = (now + FLASH_TTL_S, kind, text)
        return f"{path}?flash={key}"

    def _pop_flash(self, key: str | None) -> dict[str, str] | None:
        item = self._flash.pop(key, None) if key else None
        return {"kind": item[1], "text": item[2]} if item else None

    # -- fleet -------------------------------------------------------------------------
    def _fleet_rows(self, request: web.Request) -> tuple[list[dict[str, Any]], str, str]:
        select = request.query.get("select", "").strip()
        sort = request.query.get("sort", "host")
        if sort not in pages.SORT_KEYS:
            raise UsageError(f"sort must be one of {', '.join(pages.SORT_KEYS)}")
        hosts = pages.select_hosts(self.feed, self.inventory, select or None)
        rows = pages.sort_rows([self._row(h)[0] for h in hosts], sort)
        return rows, select, sort

    def _row(self, h: HostLive) -> tuple[dict[str, Any], str]:
        """A host's row and its HTML, computed again only when the host changed (so a
        stream re-renders what changed, not the whole fleet, on every message)."""
        cached = self._rows.get(h.host)
        if cached is None or cached[0] != h.version:
            row = pages.fleet_host(h)
            cached = (h.version, row, str(self.m.host_row(row)))
            self._rows[h.host] = cached
        return cached[1], cached[2]

    async def fleet_page(self, request: web.Request) -> web.Response:
        try:
            rows, select, sort = self._fleet_rows(request)
            error = None
        except InputError as exc:
            rows, select, sort, error = [], request.query.get("select", ""), "host", str(exc)
        return self._html(request, "fleet.html", title="Fleet", rows=rows, select=select,
                          sort=sort, sort_keys=pages.SORT_KEYS,
                          counts=pages.phase_counts(rows),
                          stream=f"/stream/fleet?{request.query_string}" if not error else None,
                          notice={"kind": "error", "text": error} if error else None)

    def _fleet_fragments(self, request: web.Request) -> Fragments:
        rows, _, sort = self._fleet_rows(request)
        frags = {f"host-{r['host']}": self._row(self.feed.hosts[r["host"]])[1] for r in rows}
        frags["counts"] = str(self.m.counts(pages.phase_counts(rows), len(rows)))
        frags["banner"] = str(self.m.banner(self._problems()))
        order = {"hosts": [f"host-{r['host']}" for r in rows]} if sort != "host" else {}
        return frags, order

    async def fleet_stream(self, request: web.Request) -> web.StreamResponse:
        self._fleet_rows(request)  # a bad selector is a 400 before the stream starts
        return await self._stream(request, lambda: self._fleet_fragments(request))

    # -- one host and its prompt -------------------------------------------------------
    def _host(self, request: web.Request) -> str:
        host = request.match_info["host"]
        if host not in self.feed.hosts:
            raise web.HTTPNotFound(text=f"unknown host {host!r} (not in the inventory)")
        return host

    def _host_context(self, request: web.Request, host: str) -> dict[str, Any]:
        h = self.feed.hosts[host]
        return {"host": host, "row": pages.fleet_host(h), "prompt": pages.host_prompt(h),
                "can_sign": self.ctx.key is not None, "log": pages.host_log(self.feed, h)}

    async def host_page(self, request: web.Request) -> web.Response:
        host = self._host(request)
        return self._html(request, "host.html", title=host, stream=f"/stream/hosts/{host}",
                          **self._host_context(request, host))

    async def host_stream(self, request: web.Request) -> web.StreamResponse:
        host = self._host(request)

        def build() -> Fragments:
            c = self._host_context(request, host)
            return {"hostinfo": str(self.m.host_info(c["row"])),
                    "prompt": str(self.m.prompt(host, c["prompt"], self._csrf(request),
                                                c["can_sign"])),
                    "hostlog": str(self.m.host_log(c["row"], c["log"])),
                    "hostactions": str(self.m.host_actions(c["row"], self._csrf(request),
                                                           c["can_sign"])),
                    "banner": str(self.m.banner(self._problems()))}, {}
        return await self._stream(request, build)

    def _open_prompt(self, host: str, prompt_id: object) -> Any:
        p = self.feed.hosts[host].prompt
        if p is None or p.prompt_id != prompt_id:
            raise UsageError(f"{host} has no open prompt {prompt_id!s} any more "
                             "(answered meanwhile, or replaced)")
        return p

    async def answer(self, request: web.Request) -> web.StreamResponse:
        host = self._host(request)
        form = await _form(request)
        prompt = self._open_prompt(host, form.get("prompt_id"))
        choices = {k[len("choice:"):]: str(v) for k, v in form.items()
                   if k.startswith("choice:")}
        if not choices:
            raise UsageError("pick a choice for at least one item")
        check_choices(prompt, choices)
        risky = destructive_choices(prompt, choices)
        if risky and form.get("confirm_destructive") != "yes":
            raise UsageError(f"{', '.join(risky)} is destructive: tick the confirmation "
                             "box to send it")
        return await self._send(request, host, prompt.prompt_id, choices, approve=False)

    async def approve(self, request: web.Request) -> web.StreamResponse:
        host = self._host(request)
        form = await _form(request)
        prompt = self._open_prompt(host, form.get("prompt_id"))
        if prompt.kind != "approval":
            raise UsageError(f"the open prompt of {host} is a {prompt.kind}, not an approval")
        return await self._send(request, host, prompt.prompt_id, {}, approve=True)

    async def _send(self, request: web.Request, host: str, prompt_id: str,
                    choices: dict[str, str], approve: bool) -> web.StreamResponse:
        who = request[IDENTITY].actor
        ok, message = await send_answer(self.ctx, host, prompt_id, choices, approve, who)
        log.info("%s answered %s prompt %s: %s", who, host, prompt_id, message)
        return self._done(request, f"/hosts/{host}", ok, f"{host}: {message}")

    async def cancel_host(self, request: web.Request) -> web.StreamResponse:
        """`fleetctl cancel HOST`: withdraw its desired state and send a signed cancel."""
        host = self._host(request)
        who = request[IDENTITY].actor
        await send_cancel(self.ctx, [host], f"cancelled from the dashboard by {who}", who)
        log.info("%s cancelled the deployment on %s", who, host)
        return self._done(request, f"/hosts/{host}", True,
                          f"{host}: desired state withdrawn, cancel sent")

    def _done(self, request: web.Request, path: str, ok: bool, text: str
              ) -> web.StreamResponse:
        if self._wants_json(request):
            return web.json_response({"ok": ok, "message": text}, status=200 if ok else 409)
        raise web.HTTPSeeOther(self._flash_url(path, "ok" if ok else "error", text))

    # -- rollouts ----------------------------------------------------------------------
    def _rollout(self, request: web.Request) -> dict[str, Any]:
        self.feed.refresh_log()
        return store.find_rollout(self.feed.doc, request.match_info["id"])

    async def rollouts_page(self, request: web.Request) -> web.Response:
        return self._html(request, "rollouts.html", title="Rollouts",
                          rows=pages.rollout_list(self.feed), stream="/stream/rollouts")

    async def rollouts_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, lambda: (
            {"rollouts": str(self.m.rollouts_table(pages.rollout_list(self.feed))),
             "banner": str(self.m.banner(self._problems()))}, {}))

    async def rollout_page(self, request: web.Request) -> web.Response:
        r = pages.rollout_page(self.feed, self._rollout(request))
        return self._html(request, "rollout.html", title=f"rollout {r['id']}", r=r,
                          stream=f"/stream/rollouts/{r['id']}")

    async def rollout_stream(self, request: web.Request) -> web.StreamResponse:
        rid = self._rollout(request)["id"]

        def build() -> Fragments:
            record = self.feed.rollouts().get(rid)
            if record is None:  # the event log was replaced (an older backup restored)
                return {"banner": str(self.m.banner([
                    *self._problems(), f"rollout {rid} is no longer in the event log "
                    "(was it replaced by an older backup?)"]))}, {}
            r = pages.rollout_page(self.feed, record)
            frags = {f"rh-{h['host']}": str(self.m.rollout_host(h)) for h in r["live"]}
            frags.update(summary=str(self.m.rollout_summary(r, self._csrf(request))),
                         batches=str(self.m.batches(r["batch_bars"])),
                         failures=str(self.m.failures(r["failures"])),
                         banner=str(self.m.banner(self._problems())))
            return frags, {}
        return await self._stream(request, build)

    async def abort(self, request: web.Request) -> web.StreamResponse:
        rid = self._rollout(request)["id"]
        out = rollout_ops.request_abort(self.feed.log, rid, request[IDENTITY].actor)
        self.feed.refresh_log()
        text = (f"abort of rollout {rid} recorded; "
                + ("its controller stops starting hosts within a second"
                   if out.driver_running else
                   f"no controller drives it now: `fleetctl rollout resume {rid}` winds "
                   "it down"))
        return self._done(request, f"/rollouts/{rid}", True, text)

    async def cancel_rollout(self, request: web.Request) -> web.StreamResponse:
        """Abort the rollout (no host starts any more) and cancel every host of it that
        was sent a desired state and has no result yet."""
        r = self._rollout(request)
        who = request[IDENTITY].actor
        rollout_ops.request_abort(self.feed.log, r["id"], who)
        hosts = [h for h, hr in r.get("hosts", {}).items()
                 if hr.get("deployment_id") is not None and hr.get("result") is None]
        if hosts:
            await send_cancel(self.ctx, hosts, f"rollout {r['id']} cancelled by {who}", who)
        self.feed.refresh_log()
        log.info("%s cancelled rollout %s (%d hosts)", who, r["id"], len(hosts))
        return self._done(request, f"/rollouts/{r['id']}", True,
                          f"rollout {r['id']} aborted; cancel sent to {len(hosts)} running "
                          f"host(s)")

    async def cont(self, request: web.Request) -> web.StreamResponse:
        rid = self._rollout(request)["id"]
        out = rollout_ops.release_batch(self.feed.log, rid)
        self.feed.refresh_log()
        return self._done(request, f"/rollouts/{rid}", True,
                          f"batch {out.batch + 1}/{out.batches} of rollout {rid} released")

    # -- sign in -----------------------------------------------------------------------
    async def login_page(self, request: web.Request) -> web.Response:
        nxt = request.query.get("next", "/")
        return self._html(request, "login.html", title="Sign in", next=_local_path(nxt))

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await _form(request)
        token = form.get("token")
        result = self.guard.login(token) if isinstance(token, str) else None
        if result is None:
            log.warning("failed sign-in from %s", request.remote)
            return self._html(request, "login.html", status=401, title="Sign in",
                              next=_local_path(str(form.get("next", "/"))),
                              notice={"kind": "error", "text": "wrong token"})
        sid, name = result
        log.info("%s signed in from %s", name, request.remote)
        resp = web.HTTPSeeOther(_local_path(str(form.get("next", "/"))))
        secure = self._origin(request).startswith("https:")
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="Strict",
                        secure=secure, path="/")
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.guard.logout(request.cookies.get(SESSION_COOKIE))
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(SESSION_COOKIE, path="/")
        raise resp

    # -- JSON API ----------------------------------------------------------------------
    async def api_hosts(self, request: web.Request) -> web.Response:
        rows, _, _ = self._fleet_rows(request)
        return web.json_response(rows)

    async def api_prompts(self, request: web.Request) -> web.Response:
        return web.json_response([p for h in sorted(self.feed.hosts)
                                  if (p := pages.host_prompt(self.feed.hosts[h]))])

    async def api_rollouts(self, request: web.Request) -> web.Response:
        self.feed.refresh_log()
        return web.json_response(pages.rollout_list(self.feed))

    async def api_rollout(self, request: web.Request) -> web.Response:
        return web.json_response(pages.rollout_page(self.feed, self._rollout(request)))

    async def api_events(self, request: web.Request) -> web.StreamResponse:
        """`event: host` (a /api/hosts row) and `event: rollout` (an /api/rollouts row)
        for everything on connect, then for each one that changes."""
        sent: dict[str, str] = {}
        versions: dict[str, int] = {}
        resp = await self._open_stream(request)
        lst = self.feed.listen()
        try:
            while True:
                lst.wake.clear()
                items = [("host", h.host, self._row(h)[0]) for h in self.feed.hosts.values()
                         if versions.get(h.host) != h.version]
                versions.update((h.host, h.version) for h in self.feed.hosts.values())
                items += [("rollout", r["id"], r) for r in pages.rollout_list(self.feed)]
                for kind, key, row in items:
                    text = json.dumps(row, separators=(",", ":"), sort_keys=True)
                    if sent.get(f"{kind}:{key}") != text:
                        sent[f"{kind}:{key}"] = text
                        try:
                            await resp.write(f"event: {kind}\ndata: {text}\n\n".encode())
                        except (ConnectionError, RuntimeError):
                            return resp
                if not await self._wait(lst.wake, resp):
                    return resp
        finally:
            self.feed.unlisten(lst)

    # -- streams -----------------------------------------------------------------------
    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no", **{k: v for k, v in SECURITY_HEADERS.items()
                                          if k != "Cache-Control"}})
        await resp.prepare(request)
        await resp.write(b"retry: 1000\n\n")
        return resp

    @staticmethod
    async def _wait(wake: asyncio.Event, resp: web.StreamResponse) -> bool:
        """Until the feed changes (then a short pause so a burst is sent as one
        message); a comment line now and then keeps proxies from closing the stream."""
        while True:
            try:
                await asyncio.wait_for(wake.wait(), KEEPALIVE_S)
                await asyncio.sleep(COALESCE_S)
                return True
            except TimeoutError:
                try:
                    await resp.write(b": keepalive\n\n")
                except (ConnectionError, RuntimeError):
                    return False

    async def _stream(self, request: web.Request, build: Callable[[], Fragments]
                      ) -> web.StreamResponse:
        resp = await self._open_stream(request)
        lst = self.feed.listen()
        sent: dict[str, str] = {}
        sent_order: dict[str, list[str]] = {}
        try:
            while True:
                lst.wake.clear()
                frags, order = build()
                changed = {k: v for k, v in frags.items() if sent.get(k) != v}
                new_order = {k: v for k, v in order.items() if sent_order.get(k) != v}
                if changed or new_order:
                    sent.update(changed)
                    sent_order.update(new_order)
                    try:
                        await resp.write(sse("fragments", {"fragments": changed,
                                                           "order": new_order}))
                    except (ConnectionError, RuntimeError):
                        return resp
                if not await self._wait(lst.wake, resp):
                    return resp
        finally:
            self.feed.unlisten(lst)


async def _form(request: web.Request) -> Any:
    """The request's form fields; a body that is no form at all is a UsageError (400)."""
    try:
        return await request.post()
    except (ValueError, HttpProcessingError) as exc:
        detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        raise UsageError(f"malformed request body: {' '.join(str(detail).split())}") from None


def _local_path(target: str) -> str:
    """Only redirect within this site (no `//evil.example` or `https://…`)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


@contextlib.asynccontextmanager
async def running(ctx: ControllerContext, inventory: Inventory, guard: Guard, host: str,
                  port: int) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    """The dashboard, up for the duration of the block: yields its URL and the task that
    follows the broker (done only if that failed). BrokerUnavailable if the broker cannot
    be reached at start; InputError if the address cannot be bound."""
    feed = Feed(ctx, inventory)
    ready = asyncio.Event()
    follower = asyncio.create_task(feed.run(ready), name="web-feed")
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([follower, waiter], return_when=asyncio.FIRST_COMPLETED)
    if follower.done():
        waiter.cancel()
        follower.result()  # raises BrokerUnavailable
    with contextlib.suppress(FlotillaError):  # a broken event log: the pages say so
        feed.refresh_log()
    dash = Dashboard(ctx, inventory, feed, guard)
    runner = web.AppRunner(dash.app(), handle_signals=False, shutdown_timeout=1.0,
                           access_log_format='%a "%r" %s %b %Tfs')
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        bound = runner.addresses[0] if runner.addresses else (host, port)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound[1]}/", follower
    finally:
        await cancel_and_wait(follower)
        await runner.cleanup()


async def serve(ctx: ControllerContext, inventory: Inventory, guard: Guard, host: str,
                port: int, announce: Callable[[str], None], stop: asyncio.Event) -> None:
    """`fleetctl serve`: run until `stop` is set (or the broker follower fails)."""
    async with running(ctx, inventory, guard, host, port) as (url, follower):
        announce(url)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([follower, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if follower.done():
            follower.result()
