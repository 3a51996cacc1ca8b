"""The one exception tree of Flotilla.

FlotillaError                   root; every expected failure is one of these
├── UsageError                  bad flags or arguments            (fleetctl exit 2)
├── InputError                  bad inventory, selector, file     (fleetctl exit 2)
│   ├── UnknownHostError        a selector names nothing known
│   └── UnknownRolloutError     a rollout id names no recorded rollout
├── BrokerUnavailable           cannot reach or stay connected    (fleetctl exit 3)
│   └── BrokerRefused           refused for good: MQTT version, credentials, ACL
├── ProtocolError               a payload we refuse to act on
│   ├── PayloadTooLarge
│   ├── UnknownVersion
│   ├── UnknownType
│   ├── InvalidBody             not msgpack, or fails the schema
│   └── BadSignature            missing, malformed or not by a trusted key
└── StateError                  local state (journal, event log) unusable

The CLIs map these to one-line messages and exit codes in a single place
(`controller.cli`, `client.cli`); anything else is a bug and may traceback.
"""

from __future__ import annotations


class FlotillaError(Exception):
    """Root of every error Flotilla expects and reports to a user."""


class UsageError(FlotillaError):
    pass


class InputError(FlotillaError):
    pass


class UnknownHostError(InputError):
    pass


class UnknownRolloutError(InputError):
    pass


class BrokerUnavailable(FlotillaError):
    pass


class BrokerRefused(BrokerUnavailable):
    """The broker answered and refused (CONNACK): retrying cannot help; the message
    names the fix (`--mqtt-version 3.1.1`, the credentials)."""


class ProtocolError(FlotillaError):
    """A payload that is refused; `reason` is a short machine-friendly tag."""

    reason = "invalid"


class PayloadTooLarge(ProtocolError):
    reason = "too_large"


class UnknownVersion(ProtocolError):
    reason = "unknown_version"


class UnknownType(ProtocolError):
    reason = "unknown_type"


class InvalidBody(ProtocolError):
    reason = "invalid_body"


class BadSignature(ProtocolError):
    reason = "bad_signature"


class StateError(FlotillaError):
    pass
