"""Inventory parsing and selector resolution, including the errors users will hit."""

from __future__ import annotations

import pytest

from controller.state.inventory import parse_inventory
from protocol.errors import InputError, UnknownHostError

INV = """
[hosts.web1]
tags = ["web", "eu"]
[hosts.web2]
tags = ["web", "us"]
[hosts.db1]
tags = ["db", "eu"]
[hosts.cache1]

[groups]
frontend = ["@web", "cache1"]
europe = ["@eu"]
all-eu-and-front = ["frontend", "europe"]
"""


@pytest.mark.parametrize("selector,hosts", [
    ("web1", ["web1"]),
    ("@web", ["web1", "web2"]),
    ("@eu", ["web1", "db1"]),
    ("frontend", ["web1", "web2", "cache1"]),
    ("@db,web2", ["web2", "db1"]),
    ("all-eu-and-front", ["web1", "web2", "db1", "cache1"]),
    ("web1, web1 ,@web", ["web1", "web2"]),
])
def test_selectors(selector: str, hosts: list[str]) -> None:
    assert parse_inventory(INV).resolve(selector) == hosts


@pytest.mark.parametrize("selector,fragment", [
    ("web3", "did you mean web2, web1"),
    ("@webb", "did you mean @web"),
    ("frontnd", "did you mean frontend"),
    ("zzz", "unknown host or group 'zzz'"),
])
def test_unknown_names_list_close_matches(selector: str, fragment: str) -> None:
    with pytest.raises(UnknownHostError, match=fragment):
        parse_inventory(INV).resolve(selector)


@pytest.mark.parametrize("text,fragment", [
    ("[hosts.web1\n", "invalid TOML"),
    ("[hosts.Web1]\n", "invalid host name"),
    ('[hosts.web1]\ntags = "web"\n', "tags must be a list"),
    # a number is no tag, not an "empty tag"; the message names the host
    ('[hosts.web1]\ntags = [1, 2]\n', "hosts.web1.tags: tags must be strings"),
    ('[hosts.web1]\ntags = ["web", true]\n', "hosts.web1.tags: tags must be strings"),
    ('[hosts.web1]\n[groups]\ng = ["web1", 3]\n', "groups.g: selectors must be strings"),
    ("[hosts]\nweb1 = 3\n", "must be a table"),
    ('[groups]\ng = ["nope"]\n', "group g"),
    ('[groups]\na = ["b"]\nb = ["a"]\n', "includes itself"),
    ("[stuff]\n", "unknown table"),
    ('[hosts.web1]\n[groups]\nweb1 = ["web1"]\n', "has the name of a host"),
])
def test_bad_inventories_fail_with_one_clear_message(text: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        parse_inventory(text)


def test_empty_selector_terms_are_errors() -> None:
    with pytest.raises(InputError):
        parse_inventory(INV).resolve("web1,,web2")
