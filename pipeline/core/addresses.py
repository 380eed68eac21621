"""Which network addresses the pipeline's own downloads may connect to (the SSRF guard's rules).

Manifests often come from other people, and a URL in one must not turn the pipeline into a client for
the machine's own services or its network's (``http://127.0.0.1:8080/admin``, cloud metadata at
``169.254.169.254``, a database on ``10.0.0.5``). So a download may connect only to globally routable
addresses unless ``images.allow_hosts`` opens a host name, an address or a network. Pure rules here
(``ipaddress`` only); ``edges/downloads.py`` applies them to the addresses it actually connects to.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["AddressPolicy", "IPAddress", "blocked_reason", "normalize_allow_entry"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: NAT64's well-known prefix (RFC 6052): the last 32 bits are an IPv4 address reached through a gateway.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: A host name label (letters, digits, hyphens; underscores occur in real internal names).
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def blocked_reason(address: IPAddress) -> str | None:
    """Why a download may not connect to ``address`` by default (``"loopback"``, ``"private"``, ...), or
    None for a globally routable address.

    An IPv6 address that embeds an IPv4 one (``::ffff:127.0.0.1``, NAT64, 6to4) is judged by the IPv4
    address it reaches. The named classes come first for a telling message; anything else that is not
    global (shared CGNAT space 100.64/10, benchmarking, documentation ranges, ...) is refused too.
    """
    address = _embedded_ipv4(address) or address
    for reason, hit in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                        ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                        ("reserved", address.is_reserved), ("private", address.is_private)):
        if hit:
            return reason
    return None if address.is_global else "not globally routable"


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def normalize_allow_entry(entry: str) -> str:
    """One ``images.allow_hosts`` entry in canonical form: a CIDR (``10.0.0.0/8``), an address
    (``192.168.1.20``, ``::1``) or a lower-case host name (``images.internal``, ``*.corp.example``).

    Raises ValueError with what to write instead: the config validator shows it under the entry's key.
    """
    text = entry.strip()
    if not text:
        raise ValueError("an entry is empty; give a host name, an IP address or a CIDR such as 10.0.0.0/8")
    if "/" in text and "://" not in text:
        return str(_network(text))
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return _host_name(text)


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a CIDR such as 10.0.0.0/8 or fd00::/8 ({exc})") from None
        raise ValueError(f"{text!r} has host bits set; write the network, {str(loose)!r}") from None


def _host_name(text: str) -> str:
    if any(mark in text for mark in ("://", "/", "@", ":", " ", "?", "#")):
        raise ValueError(f"{text!r} is not a host name, IP address or CIDR; write the bare host "
                         "(no scheme, port or path), e.g. images.internal or 10.0.0.0/8")
    name = text.lower().rstrip(".")
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{text!r} is not a valid host name") from None
    rest = name[2:] if name.startswith("*.") else name
    if not all(_LABEL.fullmatch(label) for label in rest.split(".")):
        raise ValueError(f"{text!r} is not a valid host name (letters, digits, hyphens; '*.' may start it)")
    if re.fullmatch(r"[0-9.]+", rest):
        raise ValueError(f"{text!r} is not an IP address in dotted-quad form; write it as a.b.c.d")
    return name


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """The guard one run applies: built once from ``images.allow_hosts``."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # from "*.corp.example": ".corp.example"
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_entries(cls, entries: tuple[str, ...] | list[str]) -> AddressPolicy:
        """From already-normalized ``images.allow_hosts`` entries (``normalize_allow_entry``)."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for entry in map(normalize_allow_entry, entries):
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError:
                if entry.startswith("*."):
                    suffixes.append(entry[1:])
                else:
                    names.add(entry)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def host_allowed(self, host: str) -> bool:
        """True when the URL's host name is listed: it is trusted with whatever it resolves to."""
        name = host.lower().rstrip(".")
        return name in self.names or any(name.endswith(suffix) for suffix in self.suffixes)

    def refusal(self, address: IPAddress) -> str | None:
        """Why connecting to ``address`` is refused (see ``blocked_reason``), or None when it is allowed
        (globally routable, or inside an allowed address or network)."""
        reason = blocked_reason(address)
        if reason is None:
            return None
        plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        if any(address in net or (plain is not None and plain in net) for net in self.networks):
            return None
        return reason
