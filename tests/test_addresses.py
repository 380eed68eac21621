"""The SSRF guard's rules as tables: which addresses a download may reach, and ``images.allow_hosts``
entries (normalized, or refused with a message that says what to write)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from pipeline.core.addresses import AddressPolicy, blocked_reason, normalize_allow_entry
from pipeline.core.config import config_from_dict
from pipeline.core.errors import ConfigError


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("fd12:3456::1", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("100.64.0.1", "not globally routable"),  # shared CGNAT space: neither private nor global
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: judged by the IPv4 address it reaches
    ("::ffff:169.254.169.254", "link-local"),
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("172.32.0.1", None),  # just outside 172.16/12
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),
])
def test_address_classification(address: str, reason: str | None) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) == reason


def test_policy_opens_addresses_networks_and_names() -> None:
    policy = AddressPolicy.from_entries(["10.0.0.0/8", "127.0.0.1", "images.internal", "*.corp.example"])
    ip = ipaddress.ip_address
    assert policy.refusal(ip("10.9.8.7")) is None and policy.refusal(ip("127.0.0.1")) is None
    assert policy.refusal(ip("::ffff:10.1.1.1")) is None  # the mapped form of an allowed address
    assert policy.refusal(ip("127.0.0.2")) == "loopback" and policy.refusal(ip("192.168.0.1")) == "private"
    assert policy.refusal(ip("8.8.8.8")) is None
    assert policy.host_allowed("images.internal") and policy.host_allowed("IMAGES.internal.")
    assert policy.host_allowed("cdn.corp.example") and not policy.host_allowed("corp.example")
    assert not policy.host_allowed("images.internal.evil.example") and not policy.host_allowed("localhost")
    assert AddressPolicy.from_entries([]).refusal(ip("127.0.0.1")) == "loopback"


@pytest.mark.parametrize("entry, canonical", [
    ("10.0.0.0/8", "10.0.0.0/8"),
    (" 192.168.1.20 ", "192.168.1.20"),
    ("[::1]", "::1"),
    ("FD00::/8", "fd00::/8"),
    ("Images.Internal.", "images.internal"),
    ("*.Corp.Example", "*.corp.example"),
    ("localhost", "localhost"),
    ("bücher.example", "xn--bcher-kva.example"),
])
def test_allow_entries_are_normalized(entry: str, canonical: str) -> None:
    assert normalize_allow_entry(entry) == canonical


def job(images: dict[str, Any]) -> dict[str, Any]:
    return {"request": {"model": "m"}, "input": {"manifest": "m.csv"}, "output": {"path": "o.parquet"},
            "images": images}


@pytest.mark.parametrize("entry, message", [
    ("10.0.0.1/8", "images.allow_hosts[1]: '10.0.0.1/8' has host bits set; write the network, '10.0.0.0/8'"),
    ("10.0.0.0/33", "images.allow_hosts[1]: '10.0.0.0/33' is not a CIDR such as 10.0.0.0/8"),
    ("http://images.internal", "images.allow_hosts[1]: 'http://images.internal' is not a host name, IP address "
                               "or CIDR; write the bare host (no scheme, port or path)"),
    ("images.internal:8080", "images.allow_hosts[1]: 'images.internal:8080' is not a host name"),
    ("127.1", "images.allow_hosts[1]: '127.1' is not an IP address in dotted-quad form"),
    ("bad_-.", "images.allow_hosts[1]: 'bad_-.' is not a valid host name"),
    ("", "images.allow_hosts[1]: an entry is empty; give a host name, an IP address or a CIDR"),
])
def test_allow_hosts_errors_name_the_entry(entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(job({"allow_hosts": ["ok.example", entry]}))
    assert message in str(info.value)


def test_allow_hosts_default_is_empty_and_entries_are_kept_canonical() -> None:
    assert config_from_dict(job({})).images.allow_hosts == ()
    config = config_from_dict(job({"allow_hosts": ["Images.Internal", "10.0.0.0/8"]}))
    assert config.images.allow_hosts == ("images.internal", "10.0.0.0/8")
