"""Issue 15: `fleetctl serve`, driven in a real Chromium (Playwright) against a real
Mosquitto, real simulated agents and the real `fleetctl` CLI.

Non-loopback listener: the test binds 0.0.0.0 (every interface, which is what exposing
the dashboard means) and connects through 127.0.0.1. 127.0.0.2 would not do: it is in
127.0.0.0/8, loopback like 127.0.0.1, and the server rightly treats it so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.mqtt.broker import free_port
from controller.state.eventlog import EventLog
from tests.helpers import Fleet, deploy_bg, finish, wait_for
from tests.stepsys import make_db, make_system, runs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SYSTEM = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-25.11"


# Pages carry a strict Content-Security-Policy (no eval); Playwright's wait_for_function
# evaluates strings, so test pages bypass it (test_tokens_csrf_and_cross_site checks it).


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Debian Chromium for the module; nothing is downloaded."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: run 'sudo apt-get install -y chromium' "
                    "(make setup does this)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run 'make setup' (pip install playwright; "
                    "never `playwright install`: the tests use Debian's chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Server:
    """A real `fleetctl serve` process; `url` once it announced its address."""

    def __init__(self, fleet: Fleet, listen: str, *extra: str) -> None:
        self.fleet, self.listen, self.extra = fleet, listen, extra
        self.log = fleet.root / "serve.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "serve", "--listen", self.listen, "--json",
             "-v", *self.extra], stdout=subprocess.PIPE, stderr=open(self.log, "a"),  # noqa: SIM115
            text=True, env=self.fleet.env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"fleetctl serve exited: {self.log.read_text()[-2000:]}"
        port = json.loads(line)["url"].rsplit(":", 1)[1].strip("/")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve(make_fleet) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    servers: list[Server] = []

    def start(fleet: Fleet, listen: str | None = None, *extra: str) -> Server:
        s = Server(fleet, listen or f"127.0.0.1:{free_port()}", *extra).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def http(url: str, method: str = "GET", data: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=15) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def api(server: Server, path: str, **kw: Any) -> Any:
    status, _, body = http(server.url + path, **kw)
    assert status == 200, (status, body[:300])
    return json.loads(body)


def cli_json(fleet: Fleet, *args: str) -> subprocess.Popen[str]:
    """`fleetctl ARGS --json` started in the background (collect it with `finish`)."""
    return subprocess.Popen([sys.executable, "-m", "controller", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=fleet.env())


def rollout_record(fleet: Fleet, rid: str) -> dict[str, Any]:
    """The rollout as the controller's event log holds it."""
    record: dict[str, Any] = EventLog(fleet.controller_dir).load()["rollouts"][rid]
    return record


def wait_live(page: Any) -> None:
    page.wait_for_selector("#live[data-state=live]", timeout=15000)


def test_live_50_host_rollout_in_chromium(make_fleet, serve, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    roles = ("web", "db", "cache")
    hosts = {f"node-{i:02d}": ["demo", roles[i % 3]] for i in range(1, 51)}
    fleet = make_fleet(hosts)
    fleet.start_simulated(list(hosts), "--sim-fetch-delay", "0.3", "--sim-switch-delay", "0.3",
                          "--sim-fail-rate", "0.06", "--sim-seed", "web")
    server = serve(fleet)
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page.goto(server.url + "/")
    wait_live(page)
    # the fleet table fills: every host, online, idle
    page.wait_for_function("document.querySelectorAll('#hosts tr .dot.on').length === 50",
                           timeout=20000)
    assert page.locator("#hosts tr").count() == 50
    page.evaluate("window.__notReloaded = true")
    # /api/hosts has the fields of `fleetctl status --json`, and more
    rows = {r["host"]: r for r in api(server, "/api/hosts")}
    _, status = fleet.fleetctl_json("status")  # the agents are idle: nothing moves meanwhile
    for s in status:
        assert set(s) - {"online"} <= set(rows[s["host"]])
        assert rows[s["host"]]["generation"] == s["generation"] == 0
    assert rows["node-03"]["tags"] == ["demo", "web"]

    # a rollout started from the CLI moves on the page without a reload
    proc = deploy_bg(fleet, "@demo", "--system", SYSTEM, "--batch", "25", "--timeout", "120")
    page.wait_for_function(
        "[...document.querySelectorAll('#hosts tr')].some(r => !['idle', 'no state']"
        ".includes(r.dataset.phase))", timeout=20000)
    page.wait_for_function(
        "document.querySelectorAll('#hosts tr[data-phase=succeeded]').length >= 5",
        timeout=30000)
    page.screenshot(path=str(tmp_path / "fleet-mid-rollout.png"), full_page=True)
    shot = os.environ.get("FLOTILLA_WEB_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=False)
    rc, out = finish(proc, timeout=120)
    assert out["succeeded"] + out["failed"] == 50 and out["failed"] >= 1, out
    page.wait_for_function(
        f"document.querySelectorAll('#hosts tr[data-phase=succeeded]').length === "
        f"{out['succeeded']}", timeout=20000)
    assert page.evaluate("window.__notReloaded") is True
    shown = dict(page.locator("#counts .count").evaluate_all(
        "cs => cs.map(c => [c.dataset.phase, Number(c.querySelector('b').textContent)])"))
    assert shown == dict(Counter(out["hosts"].values()))
    failed = sorted(h for h, r in out["hosts"].items() if r != "succeeded")
    assert page.get_attribute(f"#host-{failed[0]}", "data-phase") == out["hosts"][failed[0]]

    # filter by selector, sort
    page.goto(server.url + "/?select=@db,node-02&sort=phase")
    wanted = sorted([h for h, t in hosts.items() if "db" in t] + ["node-02"])
    assert sorted(page.locator("#hosts tr td.host").all_inner_texts()) == wanted
    phases = page.locator("#hosts tr").evaluate_all("rs => rs.map(r => r.dataset.phase)")
    assert phases == sorted(phases)
    assert [r["host"] for r in api(server, "/api/hosts?select=@db,node-02")] == wanted

    # rollouts: the list, and the rollout's page with its batches and failures
    rid = out["rollout"]
    cli = {what: cli_json(fleet, *args) for what, args in
           (("rollouts", ("rollouts",)), ("show", ("rollout", "show", rid)))}
    page.goto(server.url + "/rollouts")
    page.click(f"#rollout-{rid} a")
    page.wait_for_selector("#batches .batch")
    bars = page.locator("#batches .batch progress").evaluate_all(
        "ps => ps.map(p => [p.value, p.max])")
    assert bars == [[25, 25]] * 2
    assert page.locator("#failures .failure").count() == out["failed"]
    assert failed[0] in page.inner_text("#failures")
    # with the last lines of its deployment log, as `fleetctl logs` shows them
    assert "[switch] switch-to-configuration switch" in page.inner_text("#failures pre.log")
    detail = api(server, f"/api/rollouts/{rid}")
    show = finish(cli["show"])[1]
    assert {k: detail[k] for k in show} == show
    assert api(server, "/api/rollouts") == list(reversed(finish(cli["rollouts"])[1]))
    assert sum(1 for h in detail["live"] if h["result"] == "succeeded") == out["succeeded"]
    # the JSON event stream starts with every host and rollout
    with urllib.request.urlopen(server.url + "/api/events", timeout=15) as resp:
        seen: list[str] = []
        while len(seen) < 51:
            line = resp.readline().decode()
            if line.startswith("event: "):
                seen.append(line.split()[1])
    assert seen.count("host") == 50 and "rollout" in seen
    # a page reached under another name (DNS rebinding) is refused without tokens
    status_code, _, _ = http(server.url + "/api/hosts", headers={"Host": "evil.example"})
    assert status_code == 421
    page.close()


def test_prompt_answered_by_clicking(make_fleet, serve, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"pg1": ["db"]})
    db = tmp_path / "db"
    original = make_db(db)
    runlog = tmp_path / "runs.log"
    top = make_system(tmp_path / "systems", "sys-a", db, runlog)
    fleet.start_simulated(["pg1"])
    port = free_port()
    server = serve(fleet, f"127.0.0.1:{port}")
    page = browser.new_page(viewport={"width": 390, "height": 844}, bypass_csp=True)  # a phone
    page.goto(server.url + "/")
    wait_live(page)
    page.wait_for_selector("#host-pg1 .dot.on")
    page.evaluate("window.__notReloaded = true")
    # the server restarts: the page reconnects by itself
    server.stop()
    page.wait_for_selector("#live[data-state=down]", timeout=15000)
    server.start()
    wait_live(page)
    assert page.evaluate("window.__notReloaded") is True

    proc = deploy_bg(fleet, "pg1", "--system", str(top), "--approval", "ask",
                     "--timeout", "90")
    # the migration choice appears live; the link opens the host's prompt: each choice
    # with its description, the destructive one marked
    page.click("#host-pg1 .prompt a:has-text('answer')", timeout=30000)
    page.wait_for_selector("#prompt form.answer", timeout=30000)
    assert "destructive" in page.inner_text("label.choice.destructive")
    assert "slower, safer" in page.inner_text("#prompt")
    # the server itself refuses a destructive answer without its confirmation
    prompt_id = page.get_attribute("#prompt input[name=prompt_id]", "value")
    csrf = page.get_attribute("#prompt input[name=csrf]", "value")
    refused = page.request.post(server.url + "/hosts/pg1/answer", form={
        "csrf": csrf, "prompt_id": prompt_id, "choice:db.major": "dump-restore"})
    assert refused.status == 400 and "destructive" in refused.text()
    page.check("input[value=dump-restore]")
    # the destructive choice must be confirmed: dismissing sends nothing
    page.once("dialog", lambda d: d.dismiss())
    page.click("#prompt button[type=submit]")
    assert page.locator("#prompt form.answer").count() == 1
    assert runs(runlog) == []
    page.once("dialog", lambda d: d.accept())
    page.click("#prompt button[type=submit]")
    page.wait_for_selector("#notice.ok", timeout=20000)
    assert "accepted" in page.inner_text("#notice")
    # then the host waits for approval (--approval ask): approving takes a confirmation
    page.wait_for_selector("#prompt form[action$=approve]", timeout=30000)
    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        page.click("#prompt form[action$=approve] button")
    assert "accepted" in page.inner_text("#notice.ok")
    rc, out = finish(proc, timeout=90)
    assert rc == 0 and out["hosts"] == {"pg1": "succeeded"}
    assert (db / "data").read_bytes() == original + b"restored-dump-restore\napp\n"
    assert [c for s, e, _, c in runs(runlog) if s == "db" and e == "start"] == ["dump-restore"]
    journal = fleet.journal("pg1")
    answers = [r for r in journal if r["kind"] == "answer"]
    assert [a["by"] for a in answers] == ["web:local", "web:local"], answers
    page.wait_for_selector("#hostinfo.phase-succeeded")
    assert "No open prompt" in page.inner_text("#prompt")
    assert "fleetctl logs pg1 --deployment" in page.inner_text("#hostlog")
    page.close()


def test_tokens_csrf_and_cross_site(make_fleet, serve, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"a1": ["app"], "a2": ["app"], "a3": ["app"]})
    fleet.start_simulated(["a1", "a2", "a3"])
    # no token yet: a non-loopback listener is refused at start
    r = fleet.fleetctl("serve", "--listen", f"0.0.0.0:{free_port()}")
    assert r.returncode == 2 and "--new-token" in r.stderr
    r = fleet.fleetctl("serve", "--new-token", "alice")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    stored = (fleet.controller_dir / "web-tokens.json").read_text()
    assert token not in stored and "alice" in stored
    assert (fleet.controller_dir / "web-tokens.json").stat().st_mode & 0o077 == 0
    server = serve(fleet, f"0.0.0.0:{free_port()}")

    # unauthenticated requests are refused
    assert http(server.url + "/api/hosts")[0] == 401
    assert http(server.url + "/api/hosts", headers={"Authorization": "Bearer nope"})[0] == 401
    code, headers, _ = http(server.url + "/")
    assert code == 303 and headers["Location"].startswith("/login")
    assert len(api(server, "/api/hosts", headers={"Authorization": f"Bearer {token}"})) == 3
    _, headers, _ = http(server.url + "/login")
    assert "script-src 'self'" in headers["Content-Security-Policy"]

    # one host per batch, each waits for approval (in flight until approved or cancelled)
    proc = deploy_bg(fleet, "@app", "--system", SYSTEM, "--batch", "1", "--confirm-batches",
                     "--approval", "ask", "--timeout", "90")
    rid = wait_for(lambda: next(iter(api(server, "/api/rollouts", headers={
        "Authorization": f"Bearer {token}"})), {}).get("id"), what="the rollout")

    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.goto(server.url + f"/rollouts/{rid}")
    assert "/login" in page.url
    page.fill("input[name=token]", "flt_wrong")
    page.click("button[type=submit]")
    assert "wrong token" in page.inner_text("#notice")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_selector("#summary")
    assert page.url.endswith(f"/rollouts/{rid}")
    wait_live(page)
    cookie = next(c for c in context.cookies() if c["name"] == "flotilla_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""
    assert token not in page.content() and cookie["value"] not in page.content()
    page.wait_for_selector("#rh-a1[data-status='awaiting approval']", timeout=30000)

    # an action without the CSRF token, or from another origin, is refused
    no_csrf = context.request.post(server.url + f"/rollouts/{rid}/abort", form={})
    assert no_csrf.status == 403 and "CSRF" in no_csrf.text()
    csrf = page.get_attribute("meta[name=csrf-token]", "content")
    evil = context.request.post(server.url + f"/rollouts/{rid}/abort", form={"csrf": csrf},
                                headers={"Origin": "http://evil.example"})
    assert evil.status == 403 and "cross-site" in evil.text()
    # a real cross-site form in the browser: another origin posts to the dashboard
    other = context.new_page()
    other.goto("data:text/html,<form method=post action='" + server.url
               + f"/rollouts/{rid}/abort'><input name=csrf value=x><button>go</button></form>")
    with other.expect_navigation():
        other.click("button")
    assert "refused" in other.content() or "sign in" in other.content()
    other.close()
    assert rollout_record(fleet, rid)["abort_requested"] is None

    # cancel a1's deployment from its page: its wait ends, it is cancelled
    page.goto(server.url + "/hosts/a1")
    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        page.click("#hostactions button")
    assert "cancel sent" in page.inner_text("#notice.ok")
    page.goto(server.url + f"/rollouts/{rid}")
    page.wait_for_selector("#rh-a1[data-status=cancelled]", timeout=30000)
    # continue releases the next batch (the rollout waits for it)
    page.wait_for_selector("#summary .notice.warn", timeout=30000)
    with page.expect_navigation():
        page.click("#summary form[action$=continue] button")
    assert "batch 2/3" in page.inner_text("#notice.ok")
    page.wait_for_selector("#rh-a2[data-status='awaiting approval']", timeout=30000)
    # abort (recorded as web:alice): a2 still waits; then cancel the running hosts
    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        page.click("#summary form[action$=abort] button")
    record = rollout_record(fleet, rid)
    assert record["abort_requested"]["by"] == "web:alice"
    assert record["continued"] == [1]  # batch 2 (0-based 1) was released
    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        page.click("#summary form[action$=cancel] button")
    assert "cancel sent to 1 running host" in page.inner_text("#notice.ok")
    rc, out = finish(proc, timeout=90)
    assert out["status"] == "aborted", out
    assert out["hosts"]["a1"] == out["hosts"]["a2"] == "cancelled", out
    page.wait_for_selector("#summary.status-aborted", timeout=20000)

    # no secret in the server's log
    log = server.log.read_text()
    assert token not in log and cookie["value"] not in log
    assert "refused POST" in log
    context.close()


def test_the_dashboard_reconnects_after_the_broker_restarts(make_fleet, broker, serve) -> None:  # type: ignore[no-untyped-def]
    """A dashboard outlives its broker: after a restart it connects again, catches up
    and shows what happened since (here a host that came online meanwhile)."""
    fleet = make_fleet({"h1": ["web"]})
    server = serve(fleet)
    assert api(server, "/api/hosts")[0]["online"] is False
    broker.kill()
    broker.start()
    fleet.start_simulated(["h1"])
    wait_for(lambda: api(server, "/api/hosts")[0]["online"] is True, timeout=30,
             what="the dashboard to show h1 online after the broker restart")
    assert server.proc is not None and server.proc.poll() is None


def _csrf(server: Server) -> str:
    page = http(server.url + "/")[2].decode()
    found = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page)
    assert found, page[:300]
    return found.group(1)


def _one_line_error(status: int, headers: dict[str, str], body: bytes) -> str:
    assert headers["Content-Type"].startswith("application/json"), (status, headers, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error and "\n" not in error, body
    return error


FORM = "application/x-www-form-urlencoded"
JSON_ACCEPT = {"Accept": "application/json"}
BAD_REQUESTS = [
    # what, method, path, headers, body -> status, words in the error
    ("multipart form without a boundary", "POST", "/hosts/h1/answer",
     {"Content-Type": "multipart/form-data", **JSON_ACCEPT}, b"csrf=x", 400,
     "malformed request body"),
    ("multipart form with a broken part", "POST", "/rollouts/r1/abort",
     {"Content-Type": "multipart/form-data; boundary=zz", **JSON_ACCEPT},
     b"--zz\r\nbroken\r\n\r\n", 400, "malformed request body"),
    ("a body over 1 MiB", "POST", "/hosts/h1/answer", {"Content-Type": FORM, **JSON_ACCEPT},
     b"csrf=" + b"x" * (2 << 20), 413, "body"),
    ("an unknown API route", "GET", "/api/nope", {}, None, 404, "not found"),
    ("GET on an action", "GET", "/hosts/h1/answer", JSON_ACCEPT, None, 405, "not allowed"),
    ("DELETE on the API", "DELETE", "/api/hosts", {}, None, 405, "not allowed"),
    ("an unknown host's stream", "GET", "/stream/hosts/nope", {}, None, 404, "unknown host"),
    ("an unknown host in an action", "POST", "/hosts/..%2Fetc/cancel", JSON_ACCEPT, b"", 404,
     "unknown host '../etc'"),
    ("an unknown rollout", "GET", "/api/rollouts/nope", {}, None, 404, "unknown rollout"),
    ("an unknown rollout's action", "POST", "/rollouts/nope/abort", JSON_ACCEPT, b"", 404,
     "unknown rollout"),
]


@pytest.mark.parametrize(("what", "method", "path", "headers", "body", "status", "words"),
                         BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_one_line_json_error(make_fleet, serve, what: str, method: str,  # type: ignore[no-untyped-def]
                                                path: str, headers: dict[str, str],
                                                body: bytes | None, status: int,
                                                words: str) -> None:
    fleet = make_fleet({"h1": ["web"]})
    server = serve(fleet)
    if body == b"":  # an action with our page's CSRF token: only the request is wrong
        body, headers = f"csrf={_csrf(server)}".encode(), {"Content-Type": FORM, **headers}
    code, got_headers, got = http(server.url + path, method=method, data=body, headers=headers)
    assert code == status, (code, got[:300])
    assert words in _one_line_error(code, got_headers, got).lower()
    assert http(server.url + "/api/hosts")[0] == 200  # and it keeps serving
    assert "Traceback" not in server.log.read_text()


def test_an_unknown_host_page_is_the_dashboards_error_page(make_fleet, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(make_fleet({"h1": ["web"]}))
    code, headers, body = http(server.url + "/hosts/nope")
    assert code == 404 and headers["Content-Type"].startswith("text/html")
    assert "unknown host &#39;nope&#39;" in body.decode() and 'href="/"' in body.decode()


def test_a_broken_token_file_refuses_access_in_one_line(make_fleet, serve) -> None:  # type: ignore[no-untyped-def]
    """A token file that stops parsing while the server runs: every request is refused
    (503, it says why), nothing is let in, and it serves again once the file is fixed."""
    fleet = make_fleet({"h1": ["web"]})
    r = fleet.fleetctl("serve", "--new-token", "alice")
    token = r.stdout.strip()
    bearer = {"Authorization": f"Bearer {token}"}
    server = serve(fleet)
    tokens = fleet.controller_dir / "web-tokens.json"
    good = tokens.read_text()
    tokens.write_text("{not json")
    for path, headers in (("/api/hosts", bearer), ("/api/hosts", {}), ("/", JSON_ACCEPT)):
        code, got_headers, body = http(server.url + path, headers=headers)
        assert code == 503, (path, code, body[:300])
        assert "token file" in _one_line_error(code, got_headers, body)
    tokens.write_text(good)
    assert http(server.url + "/api/hosts", headers=bearer)[0] == 200
    # a bearer request with a broken form body is a 400, not a crash in the handler
    code, got_headers, body = http(
        server.url + "/hosts/h1/answer", method="POST", data=b"x",
        headers={**bearer, **JSON_ACCEPT, "Content-Type": "multipart/form-data"})
    assert code == 400 and "malformed" in _one_line_error(code, got_headers, body)
    assert "Traceback" not in server.log.read_text()


def test_a_corrupt_event_log_is_shown_not_crashed_on(make_fleet, serve) -> None:  # type: ignore[no-untyped-def]
    """The state dir's event log is corrupt when the dashboard starts: it starts anyway,
    its pages say what is wrong and how to repair it, the rollout API answers 503 with
    that line; once the log is repaired everything is back."""
    fleet = make_fleet({"h1": ["web"]})
    fleet.start_simulated(["h1"])
    rc, out = finish(deploy_bg(fleet, "h1", "--system", SYSTEM, "--timeout", "60"), timeout=60)
    assert rc == 0, out
    state = fleet.controller_dir / "state.jsonl"
    good = state.read_bytes()
    state.write_bytes(good + b'{"index": 99, "garbage\n')
    server = serve(fleet)
    for page in ("/", "/rollouts"):
        code, _, body = http(server.url + page)
        assert code == 200 and "is corrupt" in body.decode(), page
        assert "fleetctl state repair" in body.decode()
    for path in ("/api/rollouts", f"/api/rollouts/{out['rollout']}"):
        code, headers, body = http(server.url + path)
        assert code == 503, (path, code, body[:300])
        assert "fleetctl state repair" in _one_line_error(code, headers, body)
    state.write_bytes(good)
    wait_for(lambda: "is corrupt" not in http(server.url + "/")[2].decode(),
             what="the banner to go once the log is repaired")
    assert api(server, "/api/rollouts")[0]["id"] == out["rollout"]
    log = server.log.read_text()
    assert "Traceback" not in log
    assert log.count("cannot read the event log") == 1, log  # said once, not every poll


def test_an_action_while_the_broker_is_down_says_so(make_fleet, broker, serve) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"h1": ["web"]})
    server = serve(fleet)
    csrf = _csrf(server)
    broker.kill()
    wait_for(lambda: "unreachable" in http(server.url + "/")[2].decode(),
             what="the page to say the broker is unreachable")
    code, headers, body = http(server.url + "/hosts/h1/cancel", method="POST",
                               data=f"csrf={csrf}".encode(),
                               headers={"Content-Type": FORM, **JSON_ACCEPT})
    assert code == 503, (code, body[:300])
    assert "cannot reach the MQTT broker" in _one_line_error(code, headers, body)
    assert "Traceback" not in server.log.read_text()
    broker.start()
    wait_for(lambda: "unreachable" not in http(server.url + "/")[2].decode(),
             what="the banner to go after the broker is back")


def test_a_rollout_page_whose_rollout_leaves_the_log_says_so(make_fleet, serve) -> None:  # type: ignore[no-untyped-def]
    """An operator restores an older backup of the event log while a rollout's page is
    open: its live stream looked the rollout up by id and failed with a KeyError."""
    fleet = make_fleet({"h1": ["web"]})
    fleet.start_simulated(["h1"])
    state = fleet.controller_dir / "state.jsonl"
    rc, _ = finish(deploy_bg(fleet, "h1", "--system", SYSTEM, "--timeout", "60"), timeout=60)
    assert rc == 0
    backup = state.read_bytes()
    rc, out = finish(deploy_bg(fleet, "h1", "--system", SYSTEM + "-b", "--timeout", "60"),
                     timeout=60)
    assert rc == 0, out
    server = serve(fleet)
    stream = urllib.request.urlopen(f"{server.url}/stream/rollouts/{out['rollout']}",
                                    timeout=15)
    try:
        wait_for(lambda: stream.readline().startswith(b"data:"), interval=0,
                 what="the page's first fragments")
        state.write_bytes(backup)  # the restore: this rollout is not in it
        seen: list[bytes] = []
        wait_for(lambda: seen.append(stream.readline()) or b"is no longer in" in seen[-1],
                 timeout=15, interval=0, what="the stream to say the rollout is gone")
    finally:
        stream.close()
    assert http(server.url + "/")[0] == 200  # still serving
    assert "Traceback" not in server.log.read_text()
