"""Codec, signatures and topics: round trips and every class of malformed input."""

from __future__ import annotations

import msgpack
import pytest

from protocol import codec
from protocol.errors import (
    BadSignature,
    InputError,
    InvalidBody,
    PayloadTooLarge,
    UnknownType,
    UnknownVersion,
)
from protocol.models import (
    Ack,
    Answer,
    CheckReport,
    Desired,
    HostState,
    Progress,
    Prompt,
    Rejected,
    ReportItem,
    Result,
)
from protocol.signing import generate_key, sign, signed_data, verify, verify_payload
from protocol.topics import Topics, validate_host

NOW = 1_700_000_000.0
SAMPLES = [
    Desired(host="web1", deployment_id="r1", generation=3, system="/nix/store/abc-system",
            issued_at=NOW, choices={"pg.major": "pg_upgrade"}),
    Answer(host="web1", prompt_id="p1", choices={"pg.major": "dump"}, issued_at=NOW),
    Ack(host="web1", deployment_id="r1", generation=3, seq=1, time=NOW),
    Progress(host="web1", deployment_id="r1", generation=3, seq=2, time=NOW, stage="fetch",
             percent=10.0, message="copying"),
    CheckReport(host="web1", deployment_id="r1", generation=3, seq=3, time=NOW,
                items=[ReportItem(step="pg", id="major", severity="warning", message="m")]),
    Result(host="web1", deployment_id="r1", generation=3, seq=4, time=NOW, status="succeeded"),
    Rejected(host="web1", time=NOW, reason="bad_signature", message="nope"),
    HostState(host="web1", generation=3, phase="done", updated_at=NOW),
    Prompt(host="web1", prompt_id="p1", deployment_id="r1", generation=3, created_at=NOW),
]


@pytest.mark.parametrize("model", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(model) -> None:  # type: ignore[no-untyped-def]
    assert codec.decode(codec.encode(model)) == model


def env(**over) -> bytes:  # type: ignore[no-untyped-def]
    base = {"v": 1, "type": "ack", "body": {"host": "web1", "time": NOW}}
    base.update(over)
    return msgpack.packb(base)


@pytest.mark.parametrize("payload,error", [
    (b"", InvalidBody),
    (b"\xc1garbage", InvalidBody),
    (msgpack.packb([1, 2, 3]), InvalidBody),
    (msgpack.packb({"v": 1, "type": "ack"}), InvalidBody),
    (env(v=2), UnknownVersion),
    (env(v="1"), UnknownVersion),
    (env(type="launch_missiles"), UnknownType),
    (env(type=7), UnknownType),
    (env(body=[1]), InvalidBody),
    (env(body={"host": "WEB/1", "time": NOW}), InvalidBody),
    (env(body={"host": "web1", "time": NOW, "extra": 1}), InvalidBody),
    (env(body={"host": "web1"}), InvalidBody),
    # msgpack carries NaN and infinities; none of them is a time or a timeout
    (env(body={"host": "web1", "time": float("nan")}), InvalidBody),
    (env(body={"host": "web1", "time": float("inf")}), InvalidBody),
    (env(type="desired", body={"host": "web1", "deployment_id": "r1", "generation": 1,
                               "system": "/nix/store/abc-system", "issued_at": NOW,
                               "expires_at": float("nan")}), InvalidBody),
    (env(type="desired", body={"host": "web1", "deployment_id": "r1", "generation": 1,
                               "system": "/nix/store/abc-system", "issued_at": NOW,
                               "policy": {"confirm_timeout_s": float("inf")}}), InvalidBody),
    # the durations fleetctl caps (30 days), capped on the wire too: an agent given
    # confirm_timeout_s 1e20 would never roll back an unconfirmed switch
    (env(type="desired", body={"host": "web1", "deployment_id": "r1", "generation": 1,
                               "system": "/nix/store/abc-system", "issued_at": NOW,
                               "policy": {"confirm_timeout_s": 1e20}}), InvalidBody),
    (env(type="desired", body={"host": "web1", "deployment_id": "r1", "generation": 1,
                               "system": "/nix/store/abc-system", "issued_at": NOW,
                               "policy": {"prompt_deadline_s": 2592001}}), InvalidBody),
    # a generation past what JSON readers keep exactly; one past msgpack's end made the
    # controller's next desired state (this + 1) fail to encode, mid-rollout
    (env(type="host_state", body={"host": "web1", "generation": 2**64 - 1, "updated_at": NOW}),
     InvalidBody),
    (env(type="host_state", body={"host": "web1", "desired_generation": 2**53,
                                  "updated_at": NOW}), InvalidBody),
    (env(body={"host": "web1", "time": NOW, "generation": -1}), InvalidBody),
    (env(body={"host": "web1", "time": NOW, "seq": 2**63}), InvalidBody),
])
def test_malformed_payloads_are_typed_rejections(payload: bytes, error: type) -> None:
    with pytest.raises(error):
        codec.decode(payload)


def test_oversized_payload_rejected_both_ways() -> None:
    big = Progress(host="web1", time=NOW, stage="fetch", message="x" * 300_000)
    with pytest.raises(PayloadTooLarge):
        codec.encode(big)
    with pytest.raises(PayloadTooLarge):
        codec.decode(b"\x00" * (codec.DEFAULT_MAX_PAYLOAD + 1))
    assert codec.decode(codec.encode(big, max_size=10**6), max_size=10**6) == big


def test_expect_restricts_types() -> None:
    with pytest.raises(UnknownType):
        codec.decode(codec.encode(SAMPLES[2]), expect=(Desired,))


def test_signature_verifies_and_detects_tampering() -> None:
    key, other = generate_key(), generate_key()
    signed = sign(SAMPLES[0], key)
    verify(codec.decode(codec.encode(signed)), [other.public_key(), key.public_key()])
    for change in ({"generation": 4}, {"host": "web2"}, {"system": "/nix/store/evil"},
                   {"choices": {}}):
        with pytest.raises(BadSignature):
            verify(signed.model_copy(update=change), [key.public_key()])
    with pytest.raises(BadSignature):
        verify(signed, [other.public_key()])
    with pytest.raises(BadSignature):
        verify(SAMPLES[0], [key.public_key()])  # unsigned
    with pytest.raises(BadSignature):
        verify(signed.model_copy(update={"signature": b"short"}), [key.public_key()])


def test_a_body_signed_without_fields_added_since_verifies_as_it_arrived() -> None:
    """A controller older than the agent signs a Desired whose body lacks fields added
    since (`install_bootloader`, a policy field): the agent fills their defaults, and
    still checks the signature over the body as it arrived, so agents can be upgraded
    before the controller. Tampering with that body is still caught."""
    key = generate_key()
    body = sign(SAMPLES[0], key).model_dump(mode="python")
    del body["install_bootloader"]
    del body["policy"]["confirm_timeout_s"]
    body["signature"] = key.sign(signed_data("desired", body))
    payload = msgpack.packb({"v": 1, "type": "desired", "body": body}, use_bin_type=True)
    desired = codec.decode(payload, expect=(Desired,))
    assert desired.install_bootloader is False  # this version's default
    verify_payload(payload, [key.public_key()])
    tampered = msgpack.packb({"v": 1, "type": "desired", "body": body | {"generation": 9}},
                             use_bin_type=True)
    with pytest.raises(BadSignature):
        verify_payload(tampered, [key.public_key()])
    with pytest.raises(BadSignature):
        verify_payload(payload, [generate_key().public_key()])


class NewerDesired(Desired):
    """A Desired as a newer controller might have it: one field this version lacks."""

    rings: int = 0


def test_a_newer_controller_s_message_is_taken_unless_it_uses_what_is_new() -> None:
    """A body carries only the fields that differ from their defaults, so an agent older
    than its controller takes a desired state that does not use a newer field, and
    refuses one that does (it cannot know what that field asks of it)."""
    key = generate_key()
    plain = sign(NewerDesired.model_validate(SAMPLES[0].model_dump()), key)
    payload = codec.encode(plain)
    assert codec.decode(payload, expect=(Desired,)).system == SAMPLES[0].system
    verify_payload(payload, [key.public_key()])
    uses_it = codec.encode(sign(plain.model_copy(update={"rings": 3}), key))
    with pytest.raises(InvalidBody):
        codec.decode(uses_it, expect=(Desired,))


def test_signature_cannot_move_between_types() -> None:
    key = generate_key()
    answer = sign(Answer(host="web1", prompt_id="p", issued_at=NOW), key)
    assert answer.signature
    desired = SAMPLES[0].model_copy(update={"signature": answer.signature})
    with pytest.raises(BadSignature):
        verify(desired, [key.public_key()])


def test_topics_and_host_validation() -> None:
    t = Topics("fleet/v1")
    assert t.desired("web-1") == "fleet/v1/host/web-1/desired"
    assert t.all_hosts("events") == "fleet/v1/host/+/events"
    assert t.parse("fleet/v1/host/web-1/state") == ("web-1", "state")
    assert t.shared("ctl", t.all_hosts("events")) == "$share/ctl/fleet/v1/host/+/events"
    assert t.ha_discovery("update", "web-1", "system") == \
        "homeassistant/update/flotilla_web-1/system/config"
    for bad in ("", "Web1", "-web", "a/b", "a+", "#", "a" * 64, "web_1"):
        with pytest.raises(InputError):
            validate_host(bad)
    for bad_topic in ("fleet/v1/host/web1", "other/host/web1/state", "fleet/v1/host/web1/x",
                      "fleet/v1/host/BAD/state"):
        with pytest.raises(InputError):
            t.parse(bad_topic)
    with pytest.raises(InputError):
        Topics("fleet/#")


def test_desired_generation_must_be_positive() -> None:
    with pytest.raises(InvalidBody):
        body = SAMPLES[0].model_dump() | {"generation": 0}
        codec.decode(msgpack.packb({"v": 1, "type": "desired", "body": body}))


