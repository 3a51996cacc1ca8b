"""Issue 7, fuzzing: whatever the bytes or text, parsers give a result or a typed rejection.

Targets and the only exception each may raise:
  protocol.codec.decode          msgpack envelopes from the broker   ProtocolError
  protocol.signing.verify        a decoded, altered signed message   BadSignature
  Topics.parse and builders      topic strings, host names           InputError
  controller parse_inventory     fleet.toml text                     InputError
  protocol.broker.parse_broker_url   --broker URLs                   UsageError
  client.journal.Journal.open    the agent's journal file            StateError
  client.ask.homeassistant.parse_command + authorize   Home Assistant commands  (none: None)
  client.agent.Agent._handle     any topic and payload the broker delivers   (none)
  client.ask.control.dispatch + ControlServer   control-socket requests and bytes (none)

Profiles (registered here, not in the shared conftest): `ci` (the default, used by
`make test`, a few hundred examples per test) and `fuzz` (HYPOTHESIS_PROFILE=fuzz, used
by `make fuzz`: 2,000 examples per test, over 20,000 in all). Only `settings(PROFILE)`
decorators apply them, so other test files' hypothesis settings are untouched.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import shutil
import string
import tempfile
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from client.ask import homeassistant as ha
from client.journal import Journal
from controller.state.inventory import Inventory, parse_inventory
from protocol import models
from protocol.broker import BrokerAddress, BrokerCluster, parse_broker_url
from protocol.codec import REGISTRY, decode, encode
from protocol.errors import BadSignature, InputError, ProtocolError, StateError, UsageError
from protocol.models import (
    ALL_TYPES,
    Ack,
    Answer,
    CheckReport,
    Choice,
    Confirm,
    Desired,
    HostState,
    Model,
    Progress,
    Prompt,
    Rejected,
    ReportItem,
    Result,
)
from protocol.signing import generate_key, sign, verify
from protocol.topics import HOST_NAME_RE, HOST_TOPIC_KINDS, Topics

_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much],
}
settings.register_profile("ci", max_examples=150, database=None, **_COMMON)
settings.register_profile("fuzz", max_examples=2000, **_COMMON)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings(settings.get_profile(PROFILE_NAME if PROFILE_NAME in ("ci", "fuzz")
                                        else "ci"))

COUNTS: Counter[str] = Counter()
F = typing.TypeVar("F", bound=Callable[..., None])


def counted(fn: F) -> F:
    """Count the examples a property really ran (for the figures `make fuzz` prints)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        COUNTS[fn.__name__] += 1
        fn(*args, **kwargs)
    return run  # type: ignore[return-value]


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not COUNTS:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\nfuzz ({PROFILE_NAME} profile): {sum(COUNTS.values())} examples: "
                            + ", ".join(f"{k.removeprefix('test_')} {v}"
                                        for k, v in COUNTS.items()))


KEY = generate_key()
OTHER_KEY = generate_key()
TRUSTED = [KEY.public_key()]


def one_line(exc: BaseException) -> None:
    """Rejections become log lines and `Rejected` events: one line each, never empty."""
    text = str(exc)
    assert text and "\n" not in text, repr(text)


# -- strategies: msgpack values ---------------------------------------------------------
INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = st.one_of(
    st.none(), st.booleans(), INT64, st.floats(), st.text(max_size=40), st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=25,
)
FIELD_NAMES = sorted({name for cls in ALL_TYPES for name in cls.model_fields}
                     | set(Choice.model_fields) | set(ReportItem.model_fields))
BODIES = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=10), VALUES,
                         max_size=10)
ENVELOPES = st.fixed_dictionaries({
    "v": st.just(1) | VALUES,
    "type": st.sampled_from(sorted(REGISTRY)) | VALUES,
    "body": BODIES | VALUES,
})

# -- strategies: valid models --------------------------------------------------------------
HOSTS = st.from_regex(HOST_NAME_RE, fullmatch=True)
IDS = st.from_regex(r"[A-Za-z0-9._:@-]{1,24}", fullmatch=True)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=30)
CHOICE_MAP = st.dictionaries(TEXT, IDS, max_size=3)


def _literal(alias: Any) -> st.SearchStrategy[str]:
    return st.sampled_from(typing.get_args(alias))


CHOICES = st.builds(Choice, id=IDS, label=TEXT, description=TEXT, destructive=st.booleans())
ITEMS = st.builds(ReportItem, step=TEXT, id=TEXT, severity=_literal(models.Severity),
                  message=TEXT, choices=st.lists(CHOICES, max_size=2),
                  default=st.none() | TEXT)
EVENT_FIELDS: dict[str, Any] = {
    "host": HOSTS, "deployment_id": st.none() | IDS,
    "generation": st.integers(0, models.MAX_GENERATION),
    "seq": st.integers(0, models.MAX_GENERATION),
    "time": FINITE,
}
MODELS: st.SearchStrategy[Model] = st.one_of(
    st.builds(Desired, host=HOSTS, deployment_id=IDS, rollout_id=st.none() | IDS,
              generation=st.integers(1, models.MAX_GENERATION), system=st.text(min_size=1, max_size=60),
              action=_literal(models.Action), issued_at=FINITE, expires_at=st.none() | FINITE,
              check_only=st.booleans(), choices=CHOICE_MAP),
    st.builds(Answer, host=HOSTS, prompt_id=IDS, choices=CHOICE_MAP, approve=st.booleans(),
              answered_by=TEXT, issued_at=FINITE),
    st.builds(Prompt, host=HOSTS, prompt_id=IDS, deployment_id=IDS,
              generation=st.integers(0, models.MAX_GENERATION), kind=st.sampled_from(
                  ["choice", "step_failure", "approval", "reboot"]),
              items=st.lists(ITEMS, max_size=2), created_at=FINITE, deadline=st.none() | FINITE),
    st.builds(HostState, host=HOSTS, system=st.none() | TEXT, generation=st.integers(0, models.MAX_GENERATION),
              phase=_literal(models.HostPhase), deployment_id=st.none() | IDS,
              last_result=st.none() | _literal(models.ResultStatus), message=TEXT,
              needs_reboot=st.booleans(), updated_at=FINITE),
    st.builds(Confirm, host=HOSTS, generation=st.integers(0, models.MAX_GENERATION), nonce=TEXT,
              source=st.sampled_from(["agent", "controller"])),
    st.builds(Ack, **EVENT_FIELDS),
    st.builds(Rejected, **EVENT_FIELDS, reason=TEXT, message=TEXT),
    st.builds(Progress, **EVENT_FIELDS, stage=_literal(models.Stage), message=TEXT,
              percent=st.none() | st.floats(0, 100), step=st.none() | TEXT),
    st.builds(CheckReport, **EVENT_FIELDS, items=st.lists(ITEMS, max_size=2),
              open_choices=st.lists(TEXT, max_size=2), check_only=st.booleans()),
    st.builds(Result, **EVENT_FIELDS, status=_literal(models.ResultStatus), message=TEXT,
              system=st.none() | TEXT, needs_reboot=st.booleans(),
              log_tail=st.lists(TEXT, max_size=3)),
)
SIGNED = (Desired, Answer, Confirm)


def check_decode(data: bytes) -> Model | None:
    try:
        model: Model = decode(data)
    except ProtocolError as exc:
        one_line(exc)
        return None
    assert type(model) in ALL_TYPES
    return model


# -- envelopes ---------------------------------------------------------------------------
@PROFILE
@given(st.binary(max_size=2048) | st.builds(
    lambda v: msgpack.packb(v, use_bin_type=True), VALUES))
@example(b"\x91" * 100_000)              # nesting deeper than the unpacker's stack
@example(b"\xdd\xff\xff\xff\xff")        # an array header claiming 4 billion items
@example(b"\xc1")                        # the byte msgpack never uses
@counted
def test_decode_arbitrary_bytes_and_structures(data: bytes) -> None:
    check_decode(data)


@PROFILE
@given(ENVELOPES, st.sampled_from(sorted(REGISTRY)) | st.none())
@counted
def test_decode_envelope_shaped_maps(env: dict[str, Any], expect_type: str | None) -> None:
    data = msgpack.packb(env, use_bin_type=True)
    expect = (REGISTRY[expect_type],) if expect_type else None
    try:
        model: Model = decode(data, expect=expect)
    except ProtocolError as exc:
        one_line(exc)
        return
    assert expect is None or isinstance(model, expect)
    assert env["type"] == model.TYPE


@PROFILE
@given(MODELS)
@counted
def test_every_model_type_round_trips(model: Model) -> None:
    assert decode(encode(model)) == model


@PROFILE
@given(MODELS, st.data())
@counted
def test_mutated_bodies_are_rejected_or_fail_the_signature(model: Model,
                                                           data: st.DataObject) -> None:
    signed = sign(model, KEY) if isinstance(model, SIGNED) else model
    body = signed.model_dump(mode="python")
    op = data.draw(st.sampled_from(["drop", "set", "add", "retype"]))
    key = data.draw(st.sampled_from(sorted(body)))
    if op == "drop":
        del body[key]
    elif op == "set":
        body[key] = data.draw(VALUES)
    elif op == "add":
        body[data.draw(st.text(max_size=10))] = data.draw(VALUES)
    else:
        body = {"v": 1, "type": data.draw(st.sampled_from(sorted(REGISTRY))), "body": body}
    env = body if op == "retype" else {"v": 1, "type": signed.TYPE, "body": body}
    decoded = check_decode(msgpack.packb(env, use_bin_type=True))
    if decoded is None or not isinstance(decoded, SIGNED):
        return
    if decoded == signed:
        verify(decoded, TRUSTED)  # nothing that matters changed
        return
    try:
        verify(decoded, TRUSTED)
    except BadSignature as exc:
        one_line(exc)
    else:
        raise AssertionError(f"altered {decoded.TYPE} still verifies: {decoded!r}")


@PROFILE
@given(MODELS, st.data())
@counted
def test_mutated_bytes_are_rejected_or_fail_the_signature(model: Model,
                                                          data: st.DataObject) -> None:
    signed = sign(model, KEY) if isinstance(model, SIGNED) else model
    raw = bytearray(encode(signed))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif raw:
            del raw[pos:pos + data.draw(st.integers(1, 8))]
    decoded = check_decode(bytes(raw))
    if isinstance(decoded, SIGNED) and decoded != signed:
        try:
            verify(decoded, TRUSTED)
        except BadSignature:
            return
        raise AssertionError(f"altered {decoded.TYPE} still verifies")


def test_signature_by_an_untrusted_key_or_for_another_type_is_refused() -> None:
    desired = Desired(host="a1", deployment_id="d", generation=1, system="/s", issued_at=1.0)
    answer = Answer(host="a1", prompt_id="d", issued_at=1.0)
    for model in (sign(desired, OTHER_KEY), sign(answer, OTHER_KEY)):
        try:
            verify(model, TRUSTED)
        except BadSignature:
            continue
        raise AssertionError("untrusted key accepted")
    moved = answer.model_copy(update={"signature": sign(desired, KEY).signature})
    try:
        verify(moved, TRUSTED)
    except BadSignature:
        return
    raise AssertionError("a desired state's signature verified an answer")


# -- topics -----------------------------------------------------------------------------------
TOPIC_CHARS = string.ascii_lowercase + string.digits + "-+#/ $\x00A_é"
SEGMENTS = st.text(alphabet=TOPIC_CHARS, max_size=70)
TOPIC_TEXT = st.one_of(
    st.text(max_size=100),
    st.builds(lambda prefix, seg, kind: f"{prefix}/host/{seg}/{kind}",
              st.sampled_from(["fleet/v1", "fleet/v2", "", "fleet/v1/"]), SEGMENTS,
              st.sampled_from(HOST_TOPIC_KINDS) | st.text(max_size=10)),
)


@PROFILE
@given(TOPIC_TEXT)
@example("fleet/v1/host/+/desired")
@example("fleet/v1/host/#/events")
@example("fleet/v1/host/a1/desired/x")
@counted
def test_topic_parse_round_trips_or_raises_input_error(topic: str) -> None:
    t = Topics()
    try:
        host, kind = t.parse(topic)
    except InputError as exc:
        one_line(exc)
        return
    assert HOST_NAME_RE.fullmatch(host)
    assert t.host(host, kind) == topic


@PROFILE
@given(st.text(max_size=30), SEGMENTS, st.text(max_size=12), st.text(max_size=12))
@example("fleet/v1", "a/b", "sensor", "x")
@example("fleet/#", "a1", "sensor", "x")
@counted
def test_topic_builders_never_escape_a_hosts_subtree(prefix: str, host: str, component: str,
                                                     object_id: str) -> None:
    try:
        t = Topics(prefix)
    except InputError as exc:
        one_line(exc)
        return
    built: list[tuple[str, str | None]] = []
    for kind in HOST_TOPIC_KINDS:
        try:
            built.append((t.host(host, kind), kind))
        except InputError as exc:
            one_line(exc)  # the host name is quoted with repr()
    for build in (lambda: t.ha_discovery(component, host, object_id),
                  lambda: t.ha_host(host, object_id)):
        try:
            built.append((build(), None))
        except InputError:
            pass  # component and object id come from code, not from the network
    for topic, kind in built:
        assert "+" not in topic and "#" not in topic and "\x00" not in topic
        assert f"/{host}/" in topic or f"flotilla_{host}/" in topic
        if kind is not None:
            assert t.parse(topic) == (host, kind)


# -- inventory --------------------------------------------------------------------------------
def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)  # inf and -inf are TOML too
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{ " + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(x)}"
                            for k, x in v.items()) + " }"


TOML_SCALARS = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1),
                         st.floats(allow_nan=False), st.text(max_size=12))
TOML_VALUES = st.recursive(
    TOML_SCALARS, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=12)
NAMES = HOSTS | st.text(max_size=12)
TAGS = st.sampled_from(["web", "db", "eu", "a,b", ""]) | st.text(max_size=6)


@st.composite
def inventory_text(draw: st.DrawFn) -> str:
    lines: list[str] = []
    hosts = draw(st.lists(NAMES, max_size=6, unique=True))
    tags_pool: list[str] = []
    for name in hosts:
        lines.append(f"[hosts.{json.dumps(name, ensure_ascii=False)}]")
        if draw(st.booleans()):
            tags = draw(st.lists(TAGS, max_size=3))
            tags_pool += tags
            lines.append(f"tags = {toml_value(tags)}")
        else:
            lines.append(f"tags = {toml_value(draw(TOML_VALUES))}")
        if draw(st.integers(0, 9)) == 0:
            lines.append(f"{json.dumps(draw(st.text(max_size=6)))} = "
                         f"{toml_value(draw(TOML_VALUES))}")
    if draw(st.booleans()):
        lines.append("[groups]")
        members = st.sampled_from(hosts or ["x"]) | st.sampled_from(
            [f"@{t}" for t in tags_pool] or ["@web"]) | NAMES
        for g in draw(st.lists(NAMES, max_size=4, unique=True)):
            lines.append(f"{json.dumps(g, ensure_ascii=False)} = "
                         f"{toml_value(draw(st.lists(members, max_size=4)))}")
    if draw(st.booleans()):
        lines.append("[rollout]")
        lines.append(f"batch = {toml_value(draw(TOML_VALUES))}")
    if draw(st.integers(0, 9)) == 0:
        lines.append(f"[{json.dumps(draw(st.text(max_size=6)))}]")
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 3)) == 0:  # damage it
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(max_size=4)) + text[pos + draw(st.integers(0, 4)):]
    return text


def deep_groups(n: int) -> str:
    return "[hosts.h]\n[groups]\n" + "".join(f'g{i} = ["g{i + 1}"]\n' for i in range(n)) + \
        f'g{n} = ["h"]\n'


@PROFILE
@given(inventory_text() | st.text(max_size=300), st.lists(NAMES | TAGS.map("@{}".format),
                                                             max_size=3))
@example("a = " + "[" * 5000, [])                         # nesting beyond the recursion limit
@example(deep_groups(3000), ["g0"])                        # a group chain as deep
@example('[hosts.a]\n[groups]\nx = ["y"]\ny = ["x"]\n', ["x"])  # a cycle
@example('hosts = 1\n', [])
@example('[hosts.a]\ntags = [1]\n', [])
@counted
def test_inventory_parses_or_raises_input_error(text: str, selector_terms: list[str]) -> None:
    try:
        inv = parse_inventory(text, "fuzz.toml")
    except InputError as exc:
        one_line(exc)
        return
    assert isinstance(inv, Inventory)
    for name in inv.groups:
        assert set(inv.resolve(name)) <= set(inv.hosts)
    selector = ",".join(selector_terms)
    try:
        chosen = inv.resolve(selector)
    except InputError as exc:
        one_line(exc)
        return
    assert set(chosen) <= set(inv.hosts) and len(chosen) == len(set(chosen))


# -- broker URLs ---------------------------------------------------------------------------
# The password is framed by markers made of a character no other part of the URL can
# hold, so "the error message or str() shows (part of) the password" is decidable.
MARK_A, MARK_B = "\u00a7pw", "wp\u00a7"
URL_CHARS = string.ascii_letters + string.digits + ":/?#@[]%.-_ +"
URLS_WITH_PASSWORD = st.builds(
    lambda scheme, user, middle, host, port: f"{scheme}://{user}:{MARK_A}{middle}{MARK_B}"
                                            f"@{host}{port}",
    st.sampled_from(["mqtt", "mqtts", "ws", "wss", "http", ""]),
    st.text(alphabet=URL_CHARS, max_size=8),
    st.text(alphabet=URL_CHARS, max_size=12),
    st.sampled_from(["127.0.0.1", "broker.example", "[::1]", "", "ho st", "[bad"]),
    st.sampled_from(["", ":1883", ":0", ":99999", ":x", ":-1"]))


@PROFILE
@given(st.text(max_size=80))
@example("mqtt://[::1")
@example("mqtt://h:99999")
@counted
def test_broker_url_parses_or_raises_usage_error(url: str) -> None:
    try:
        address = parse_broker_url(url)
    except UsageError as exc:
        one_line(exc)
        return
    assert isinstance(address, BrokerAddress)
    assert 0 < address.port < 65536 and address.host
    assert address.client_kwargs()["hostname"] == address.host
    assert "password=" not in repr(address)


@PROFILE
@given(URLS_WITH_PASSWORD)
@example(f"mqtt://u:{MARK_A}/{MARK_B}@h:1883")
@example(f"mqtt://u:{MARK_A}?{MARK_B}@h")
@example(f"mqtt://u:{MARK_A}#{MARK_B}@h")
@counted
def test_broker_url_errors_and_str_never_show_the_password(url: str) -> None:
    try:
        address = parse_broker_url(url)
    except UsageError as exc:
        one_line(exc)
        assert "\u00a7" not in str(exc), str(exc)
        return
    shown = str(address) + repr(address)
    assert "\u00a7" not in shown, shown


@PROFILE
@given(st.text(max_size=30), st.sampled_from(["mqtts", "wss"]))
@counted
def test_percent_encoded_credentials_round_trip(secret: str, scheme: str) -> None:
    from urllib.parse import quote
    password = MARK_A + secret  # the marker is in the password only
    address = parse_broker_url(f"{scheme}://{quote('flotilla-controller', safe='')}:"
                               f"{quote(password, safe='')}@broker.example:8883"
                               + ("/mqtt" if scheme == "wss" else ""))
    assert address.username == "flotilla-controller" and address.password == password
    assert address.tls and address.port == 8883
    assert "\u00a7" not in str(address) + repr(address)


# -- the agent's journal -----------------------------------------------------------------------
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10))
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
GOOD_DESIRED = base64.b64encode(encode(sign(Desired(
    host="a1", deployment_id="d1", generation=1, system="/nix/store/x", issued_at=1.0),
    KEY))).decode()
RECORD_FIELDS = {
    "deployment_id": st.sampled_from(["d1", "d2"]) | JSON_VALUES,
    "generation": st.integers(0, 3) | JSON_VALUES,
    "desired": st.just(GOOD_DESIRED) | JSON_VALUES,
    "previous": st.none() | JSON_VALUES,
    "stage": st.sampled_from(["fetch", "switch", "step:db"]) | JSON_VALUES,
    "stages": st.lists(st.sampled_from(["fetch", "switch"]), max_size=2) | JSON_VALUES,
    "data": JSON_VALUES,
    "status": st.sampled_from(["succeeded", "failed"]) | JSON_VALUES,
    "message": st.text(max_size=8) | JSON_VALUES,
    "system": st.none() | st.just("/nix/store/x") | JSON_VALUES,
    "needs_reboot": st.booleans() | JSON_VALUES,
    "prompt_id": st.sampled_from(["p1"]) | JSON_VALUES,
    "prompt": st.just({}) | JSON_VALUES,
    "choices": st.just({"db.x": "a"}) | JSON_VALUES,
    "source": st.just("remote") | JSON_VALUES,
    "key": st.just("needs_reboot") | JSON_VALUES,
    "value": JSON_VALUES,
}
RECORDS = st.fixed_dictionaries(
    {"kind": st.sampled_from(["start", "accept", "result", "begin", "end", "reset", "prompt",
                              "answer", "note"]) | JSON_VALUES},
    optional=RECORD_FIELDS)
JOURNAL_LINES = st.lists(
    st.one_of(RECORDS.map(lambda r: json.dumps(r).encode()),
              JSON_VALUES.map(lambda v: json.dumps(v).encode()),
              st.binary(max_size=30)),
    max_size=12)


@PROFILE
@given(st.binary(max_size=1024) | JOURNAL_LINES.map(lambda lines: b"\n".join(lines) + b"\n")
       | st.tuples(JOURNAL_LINES, st.binary(max_size=20)).map(
           lambda t: b"\n".join(t[0]) + b"\n" + t[1]))
@example(b"[" * 100_000 + b"\n")                               # deeper than json can recurse
@example(b'{"kind":"accept","deployment_id":"d","generation":1,"desired":""}\n'
         b'{"kind":"begin","deployment_id":"d","stage":5}\n')  # a stage that is no string
@example(b'{"kind":"accept","deployment_id":"d","generation":"5","desired":""}\n')
@example(b'{"kind":"accept","deployment_id":["d"],"generation":1,"desired":""}\n')
@example(b'{"kind":"result","deployment_id":"d","generation":true,"status":"succeeded"}\n')
@counted
def test_journal_open_trusts_only_well_formed_records(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "journal.jsonl").write_bytes(raw)
        journal = Journal(Path(tmp))
        try:
            state = journal.open()
        except StateError as exc:
            one_line(exc)
            return
        finally:
            journal.close()
        # whatever was applied has the types the agent relies on: nothing half-applied
        assert type(state.highest_generation) is int and type(state.generation) is int
        assert state.system is None or isinstance(state.system, str)
        for key, rec in state.results.items():
            assert isinstance(key, str) and key == rec.deployment_id
            assert type(rec.generation) is int and isinstance(rec.status, str)
        active = state.active
        if active is not None:
            assert isinstance(active.deployment_id, str) and type(active.generation) is int
            assert isinstance(active.desired, bytes)
            assert all(isinstance(s, str) for s in active.started | set(active.done))
            assert all(isinstance(k, str) and isinstance(v, str)
                       for k, v in active.answers.items())
        # the torn tail is gone: a second open reads the same state without new damage
        again = Journal(Path(tmp))
        state2 = again.open()
        again.close()
        assert state2.results.keys() == state.results.keys()
        assert state2.highest_generation == state.highest_generation


# -- Home Assistant commands ------------------------------------------------------------------
# What reaches the agent on its `ha/...` command topics is whatever a Home Assistant user
# (or an entity someone else announced) publishes: it is parsed to a command or refused
# with a log line (None), never an exception; without this host's token nothing passes,
# and `authorize` keeps reboots behind --ha-reboot whatever the payload says.
HA_HOST = "h1"
HA_TOKEN = "tok_" + "z" * 40
HA_TOPICS = ha.HaTopics.of(Topics(), HA_HOST)
HA_LEAVES = [HA_TOPICS.install, HA_TOPICS.reboot, HA_TOPICS.answer, HA_TOPICS.status,
             HA_TOPICS.update, "homeassistant/select/flotilla_h1/x/config"]
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
HA_FIELDS = st.fixed_dictionaries({}, optional={
    "action": st.sampled_from(["install", "reboot", "answer"]) | JSONISH,
    "token": st.sampled_from([HA_TOKEN, HA_TOKEN[:-1], HA_TOKEN + "x", "", HA_TOKEN.upper()])
             | JSONISH,
    "prompt_id": IDS | JSONISH, "key": st.sampled_from(["deploy.reboot", "db.major"]) | TEXT,
    "choice": st.sampled_from(["now", "later", "upgrade"]) | JSONISH,
    "extra": JSONISH,
})
HA_PAYLOADS = st.one_of(st.binary(max_size=300), HA_FIELDS.map(lambda d: json.dumps(d).encode()),
                        JSONISH.map(lambda v: json.dumps(v).encode()))
HA_PROMPTS = st.none() | st.builds(
    Prompt, host=st.just(HA_HOST), prompt_id=IDS, deployment_id=IDS, generation=st.just(1),
    kind=st.sampled_from(["choice", "step_failure", "approval", "reboot"]),
    items=st.lists(st.builds(ReportItem, step=st.sampled_from(["deploy", "db"]),
                             id=st.sampled_from(["reboot", "approve", "major"]),
                             severity=st.just("warning"), message=TEXT,
                             choices=st.lists(CHOICES, max_size=2)), max_size=2),
    created_at=FINITE)


@PROFILE
@given(st.sampled_from(HA_LEAVES), HA_PAYLOADS, HA_PROMPTS, st.booleans())
@example(HA_TOPICS.reboot, b'{"action":"reboot"}', None, True)
@example(HA_TOPICS.reboot, json.dumps({"action": "reboot", "token": HA_TOKEN}).encode(), None,
         False)
@example(HA_TOPICS.answer, json.dumps({"prompt_id": "p", "key": "deploy.reboot",
                                       "choice": "now", "token": HA_TOKEN}).encode(), None, False)
@example(HA_TOPICS.install, b"{" * 5000, None, True)
@counted
def test_home_assistant_commands_parse_or_are_refused(topic: str, payload: bytes,
                                                      prompt: Prompt | None,
                                                      reboot_allowed: bool) -> None:
    cmd = ha.parse_command(Topics(), HA_HOST, topic, payload, HA_TOKEN)
    if cmd is None or isinstance(cmd, ha.Reannounce):
        return
    # only a payload carrying exactly this host's token becomes a command
    assert json.loads(payload)["token"] == HA_TOKEN
    why = ha.authorize(cmd, prompt, reboot_allowed=reboot_allowed)
    reboots = isinstance(cmd, ha.Reboot) or (isinstance(cmd, ha.Answer)
                                             and cmd.key == "deploy.reboot"
                                             and cmd.choice == "now")
    if reboots and not reboot_allowed:
        assert why is not None and "--ha-reboot" in why
    if isinstance(cmd, ha.Approve) and (prompt is None or prompt.kind != "approval"):
        assert why is not None
    if isinstance(cmd, ha.Answer) and why is None:
        assert prompt is not None and prompt.prompt_id == cmd.prompt_id
        assert cmd.key in {i.key for i in prompt.items if i.choices}
    if why is not None:
        one_line(ValueError(why))


# -- what reaches the agent: any topic, any payload -------------------------------------------
# The broker delivers whatever matches the agent's subscriptions (a compromised broker or a
# misconfigured ACL delivers anything): `Agent._handle` acts on a message or refuses it with
# a reported reason, never raises, and journals an accept only for a signed desired state
# for this host.
AGENT_TOPICS = Topics("fleet/v1")
AGENT_HOST = "a1"
OWN_TOPICS = [AGENT_TOPICS.desired(AGENT_HOST), AGENT_TOPICS.answer(AGENT_HOST),
              AGENT_TOPICS.confirm(AGENT_HOST)]
SIGNED_PAYLOADS = [encode(sign(m, KEY)) for m in (
    Desired(host=AGENT_HOST, deployment_id="d1", generation=1, system="/s", issued_at=1.0),
    Desired(host="other", deployment_id="d2", generation=2, system="/s", issued_at=1.0),
    Answer(host=AGENT_HOST, prompt_id="p", choices={"a.b": "c"}, issued_at=1.0),
    Confirm(host=AGENT_HOST, generation=1, nonce="n", source="controller"),
)]


def agent_for_fuzz(state_dir: Path) -> tuple[Any, list[tuple[str, bytes]]]:
    from client.agent import Agent, AgentConfig
    from client.host.sim import SimulatedBackend

    config = AgentConfig(host=AGENT_HOST, broker=BrokerCluster.parse("mqtt://127.0.0.1:1"),
                         state_dir=state_dir, trusted_keys=TRUSTED, topics=AGENT_TOPICS,
                         control_socket=False)
    agent = Agent(config, SimulatedBackend(state_dir, AGENT_HOST))
    sent: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes, **_: Any) -> None:
        sent.append((topic, payload))

    agent.reporter._publish = publish  # no broker: what the agent would publish is recorded
    return agent, sent


@functools.cache
def fuzz_agent() -> tuple[Any, list[tuple[str, bytes]], Any, Path]:
    """One agent (and event loop) for every example: its journal only ever grows."""
    import asyncio

    state_dir = Path(tempfile.mkdtemp(prefix="flotilla-fuzz-agent-"))
    agent, sent = agent_for_fuzz(state_dir)
    loop = asyncio.new_event_loop()

    def cleanup() -> None:
        agent.journal.close()
        loop.close()
        shutil.rmtree(state_dir, ignore_errors=True)

    atexit.register(cleanup)
    return agent, sent, loop, state_dir


def accepts(state_dir: Path) -> int:
    return sum(1 for r in (state_dir / "journal.jsonl").read_text().splitlines()
               if '"kind":"accept"' in r)


@PROFILE
@given(st.sampled_from(OWN_TOPICS) | TOPIC_TEXT,
       st.binary(max_size=300) | st.sampled_from(SIGNED_PAYLOADS) | ENVELOPES.map(msgpack.packb))
@example(AGENT_TOPICS.desired(AGENT_HOST), b"")
@example(AGENT_TOPICS.desired(AGENT_HOST), SIGNED_PAYLOADS[1])    # signed, but for another host
@example(AGENT_TOPICS.confirm(AGENT_HOST), SIGNED_PAYLOADS[3])    # a confirm nobody asked for
@counted
def test_agent_handles_any_topic_and_payload(topic: str, payload: bytes) -> None:
    import aiomqtt

    try:  # what a broker can deliver at all: a valid topic name
        message = aiomqtt.Message(topic, payload, 0, False, 1, None)
    except ValueError:
        assume(False)
    agent, sent, loop, state_dir = fuzz_agent()
    before, sent_before = accepts(state_dir), len(sent)
    loop.run_until_complete(agent._handle(message))
    if accepts(state_dir) > before:
        assert (topic, payload) == (AGENT_TOPICS.desired(AGENT_HOST), SIGNED_PAYLOADS[0])
    for sent_topic, _ in sent[sent_before:]:  # anything it said went to its own subtree
        assert sent_topic.startswith(f"fleet/v1/host/{AGENT_HOST}/")


# -- the control socket: any request, any bytes -------------------------------------------------
# Local users in the socket's group send what they like: every request gets one JSON reply
# ({"ok": ...}), the server never dies of one, and answers reach the agent only in the shape
# it expects (a prompt id string and a non-empty string -> string map).
CONTROL_REQUESTS = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"op": st.sampled_from(["list_prompts", "answer", "approve",
                                                  "status", "nope"]) | JSON_VALUES},
                          optional={"prompt_id": JSON_VALUES | st.just("p-1"),
                                    "choices": JSON_VALUES | st.just({"db.schema": "migrate"})}),
)


class FuzzControl:
    def __init__(self) -> None:
        self.answers: list[tuple[str, dict[str, str], str]] = []

    async def list_prompts(self) -> list[Prompt]:
        return []

    async def answer(self, prompt_id: str, choices: dict[str, str],
                     source: str) -> tuple[bool, str]:
        assert isinstance(prompt_id, str) and prompt_id
        assert choices and all(isinstance(k, str) and isinstance(v, str) and k and v
                               for k, v in choices.items())
        self.answers.append((prompt_id, choices, source))
        return True, "recorded"

    async def approve(self, source: str) -> tuple[bool, str]:
        return False, "nothing to approve"

    async def status(self) -> HostState:
        return HostState(host="a1", updated_at=1.0)


@PROFILE
@given(CONTROL_REQUESTS)
@counted
def test_control_dispatch_replies_to_any_request(request: Any) -> None:
    import asyncio

    from client.ask.control import dispatch

    reply = asyncio.run(dispatch(FuzzControl(), request, "local:fuzz"))
    assert isinstance(reply.get("ok"), bool)
    json.dumps(reply)
    if not reply["ok"]:
        assert isinstance(reply.get("error", reply.get("message")), str)


@functools.cache
def fuzz_control_server() -> tuple[Any, Any]:
    """One server (on its own loop, run while an example runs) for every example."""
    import asyncio

    from client.ask.control import ControlServer, socket_path

    d = Path(tempfile.mkdtemp(prefix="flotilla-fuzz-ctl-"))
    loop = asyncio.new_event_loop()
    server = ControlServer(socket_path(d), FuzzControl(), group=None)
    loop.run_until_complete(server.start())

    def cleanup() -> None:
        loop.run_until_complete(server.close())
        loop.close()
        shutil.rmtree(d, ignore_errors=True)

    atexit.register(cleanup)
    return server, loop


@PROFILE
@given(st.lists(st.binary(max_size=200) | CONTROL_REQUESTS.map(
    lambda r: json.dumps(r).encode()), max_size=6))
@example([b"\xff\xfe", b"{", b'{"op":"status"}'])
@example([b"x" * 70_000])                        # longer than a request may be
@counted
def test_control_socket_survives_any_bytes(lines: list[bytes]) -> None:
    import asyncio

    server, loop = fuzz_control_server()

    async def exchange() -> tuple[list[bytes], bytes]:
        reader, writer = await asyncio.open_unix_connection(str(server.path), limit=1 << 20)
        writer.write(b"\n".join(lines) + b"\n")
        await writer.drain()
        writer.write_eof()
        replies = []
        while line := await asyncio.wait_for(reader.readline(), 10):
            replies.append(line)
        writer.close()
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(b'{"op":"status"}\n')
        after = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return replies, after

    replies, after = loop.run_until_complete(exchange())
    assert all(isinstance(json.loads(r).get("ok"), bool) for r in replies)
    assert json.loads(after)["ok"] is True  # the server lives on
