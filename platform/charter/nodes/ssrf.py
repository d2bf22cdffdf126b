"""Node URL safety: validate node base URLs against SSRF and pin calls to the checked address.

Charter parses node URLs with its own strict parser and refuses anything on which URL parsers,
resolvers and browsers could disagree (backslashes, whitespace, percent-encoded or non-ASCII
hosts, legacy IPv4 notations of allowed addresses), so the host it checks is the host every
later component sees. Every address a name resolves to must pass; at call time the name is
resolved again (DNS may have been rebound since registration) and the request goes to exactly
the address that was checked, with the original name kept for `Host` and TLS verification.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from charter.errors import CharterError, ConfigurationError, ValidationFailedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 500  # fits nodes.base_url (String(500)); canonical form is never longer
DEFAULT_PORTS = {"http": 80, "https": 443}

# Stable reason codes, in `details["reason"]` of NodeUrlRefusedError.
REASONS = (
    "invalid_url",
    "url_too_long",
    "invalid_characters",
    "scheme_not_allowed",
    "missing_host",
    "credentials_in_url",
    "fragment_not_allowed",
    "query_not_allowed",
    "invalid_port",
    "invalid_host",
    "non_ascii_host",
    "percent_encoded_host",
    "zone_id_not_allowed",
    "non_canonical_ip",
    "hostname_not_allowed",
    "unresolvable",
    "metadata_address",
    "link_local",
    "unspecified_address",
    "multicast_address",
    "broadcast_address",
    "reserved_address",
    "address_not_allowed",
)

_MESSAGES = {
    "invalid_url": "the node URL is empty or not text",
    "url_too_long": f"the node URL is longer than {MAX_URL_LENGTH} characters",
    "invalid_characters": "the node URL contains whitespace, control characters, backslashes "
    "or non-ASCII characters",
    "scheme_not_allowed": "the node URL must start with http:// or https://",
    "missing_host": "the node URL has no host",
    "credentials_in_url": "the node URL must not carry credentials (user:password@)",
    "fragment_not_allowed": "the node URL must not have a fragment (#...)",
    "query_not_allowed": "a node base URL must not have a query string",
    "invalid_port": "the node URL's port must be a number from 1 to 65535",
    "invalid_host": "the node URL's host is not a valid host name or IP address",
    "non_ascii_host": "the node URL's host must be ASCII (use the xn-- form of an IDN)",
    "percent_encoded_host": "the node URL's host must not be percent-encoded",
    "zone_id_not_allowed": "IPv6 zone ids are not allowed in node URLs",
    "non_canonical_ip": "write the IPv4 address as four decimal numbers (a.b.c.d)",
    "hostname_not_allowed": "node URLs must use an IP address, not a host name",
    "unresolvable": "the node's host name does not resolve",
    "metadata_address": "the node URL points at a cloud metadata address",
    "link_local": "the node URL points at a link-local address",
    "unspecified_address": "the node URL points at an unspecified address",
    "multicast_address": "the node URL points at a multicast address",
    "broadcast_address": "the node URL points at the broadcast address",
    "reserved_address": "the node URL points at a reserved address",
    "address_not_allowed": "the node URL points at an address outside the allowed node networks",
}


class NodeUrlRefusedError(ValidationFailedError):
    """A node URL failed the SSRF policy; `details["reason"]` says why. Never echoes the URL."""

    status = 422
    code = "node_url_refused"

    def __init__(self, reason: str) -> None:
        super().__init__(f"node URL refused: {_MESSAGES[reason]}", details={"reason": reason})
        self.reason = reason


class NodeRedirectRefusedError(CharterError):
    """A node answered a redirect; Charter never follows one (it could lead anywhere)."""

    status = 502
    code = "node_redirect_refused"


# Refused whatever the allowlist says. Metadata first: those addresses are also link-local.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle IMDS
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.170.23",  # AWS EKS pod identity agent
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure WireServer
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity agent over IPv6
    )
)
_NET = ipaddress.ip_network
_ALWAYS_REFUSED: tuple[tuple[IPNetwork, str], ...] = (
    (_NET("169.254.0.0/16"), "link_local"),
    (_NET("fe80::/10"), "link_local"),
    (_NET("0.0.0.0/8"), "unspecified_address"),
    (_NET("::/128"), "unspecified_address"),
    (_NET("224.0.0.0/4"), "multicast_address"),
    (_NET("ff00::/8"), "multicast_address"),
    (_NET("255.255.255.255/32"), "broadcast_address"),
    (_NET("240.0.0.0/4"), "reserved_address"),
)
_IPV4_COMPATIBLE = _NET("::/96")
_IPV4_TRANSLATED = _NET("::ffff:0:0:0/96")  # SIIT, RFC 2765
_NAT64_WELL_KNOWN = _NET("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL = _NET("64:ff9b:1::/48")  # RFC 8215, /48 layout of RFC 6052

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?")
_NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+")


def _refuse(reason: str) -> NodeUrlRefusedError:
    return NodeUrlRefusedError(reason)


@dataclass(frozen=True, slots=True)
class ValidatedUrl:
    """A node base URL that passed the policy, in canonical form."""

    url: str  # canonical: lowercase scheme and host, no default port
    scheme: str
    host: str  # lowercase host name without trailing dot, or the IP address (no brackets)
    port: int  # effective port (the scheme's default when the URL names none)
    path: str  # as given ("" or starting with "/")
    is_ip: bool
    addresses: tuple[str, ...]  # the addresses checked (informational at registration)

    @property
    def host_header(self) -> str:
        """`Host` header value: host[:port], IPv6 bracketed, default port left out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    """Where to connect right now: `url` is the base URL with the checked IP as its host."""

    url: str  # pinned base URL, no trailing slash: append paths that start with "/"
    ip: str  # the checked address the request will connect to
    validated: ValidatedUrl  # the original URL, as re-validated at call time

    @property
    def host_header(self) -> str:
        return self.validated.host_header

    @property
    def sni_hostname(self) -> str | None:
        """Name TLS must verify; None for plain http and for IP-literal hosts."""
        v = self.validated
        return v.host if v.scheme == "https" and not v.is_ip else None


class NodeUrlPolicy:
    """Which node URLs Charter may register and call."""

    def __init__(self, allowed_networks: Iterable[str] | str, allow_hostnames: bool = True):
        if isinstance(allowed_networks, str):
            allowed_networks = [n for n in allowed_networks.split(",") if n.strip()]
        networks: list[IPNetwork] = []
        problems: list[str] = []
        for raw in allowed_networks:
            try:
                networks.append(ipaddress.ip_network(raw.strip(), strict=True))
            except ValueError as exc:
                problems.append(f"node network {raw!r}: {exc}")
        if problems:
            raise ConfigurationError("invalid node networks", details={"problems": problems})
        self.allowed_networks: tuple[IPNetwork, ...] = tuple(networks)
        self.allow_hostnames = allow_hostnames
        # URLs with an IP literal that passed: their verdict cannot change for this policy
        # (no DNS involved). Names are never cached: they are resolved again every call.
        self._passed_literals: dict[str, ValidatedUrl] = {}

    def validate(self, url: str) -> ValidatedUrl:
        """Check a URL at registration; returns its canonical form or raises the refusal."""
        known = self._passed_literals.get(url) if isinstance(url, str) else None
        if known is not None:
            return known
        scheme, host, port, path = _parse(url)
        addr = _ip_literal(host)
        if addr is not None:
            ip = self._checked(addr)
            if isinstance(addr, ipaddress.IPv4Address) and host != str(addr):
                raise _refuse("non_canonical_ip")  # e.g. 012.0.0.5: octal 10 or decimal 12?
            addresses: tuple[str, ...] = (str(ip),)
            canonical_host, is_ip = str(ip), True
        else:
            if not self.allow_hostnames:
                raise _refuse("hostname_not_allowed")
            canonical_host, addresses, is_ip = host, self._resolve_name(host, port), False
        shown = f"[{canonical_host}]" if ":" in canonical_host else canonical_host
        if port != DEFAULT_PORTS[scheme]:
            shown = f"{shown}:{port}"
        validated = ValidatedUrl(
            url=f"{scheme}://{shown}{path}",
            scheme=scheme,
            host=canonical_host,
            port=port,
            path=path,
            is_ip=is_ip,
            addresses=addresses,
        )
        if is_ip and len(self._passed_literals) < 4096:
            self._passed_literals[url] = validated
        return validated

    def resolve(self, url: str | ValidatedUrl) -> ResolvedTarget:
        """At call time: re-validate, resolve again, and pin the first checked address."""
        v = self.validate(url.url if isinstance(url, ValidatedUrl) else url)
        ip = v.addresses[0]
        host = f"[{ip}]" if ":" in ip else ip
        pinned = f"{v.scheme}://{host}:{v.port}{v.path.rstrip('/')}"
        return ResolvedTarget(url=pinned, ip=ip, validated=v)

    def check_address(self, addr: IPAddress) -> IPAddress:
        """The address to connect to if `addr` passes; raises the refusal otherwise."""
        return self._checked(addr)

    def _checked(self, addr: IPAddress) -> IPAddress:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket connects to the IPv4 address itself
        embedded = _embedded_ipv4(addr)
        for a in (addr, *embedded):
            reason = _always_refused(a)
            if reason:
                raise _refuse(reason)
        for a in (addr, *embedded):
            if not any(a in net for net in self.allowed_networks):
                raise _refuse("address_not_allowed")
        return addr

    def _resolve_name(self, host: str, port: int) -> tuple[str, ...]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise _refuse("unresolvable") from None
        addresses: list[str] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                raise _refuse("unresolvable")
            try:
                addr = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            except ValueError:
                raise _refuse("unresolvable") from None
            if isinstance(sockaddr, tuple) and len(sockaddr) == 4 and sockaddr[3]:
                raise _refuse("link_local")  # a scope id only comes with scoped addresses
            text = str(self._checked(addr))
            if text not in addresses:
                addresses.append(text)
        if not addresses:
            raise _refuse("unresolvable")
        return tuple(addresses)


def pinned_request_kwargs(
    target: ResolvedTarget, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Keyword arguments for `client.get/post/request/stream(target.url + path, **kwargs)`.

    The URL already carries the checked IP; these keep the original name in `Host` and, for
    https, make httpcore send it as SNI and verify the certificate against it.
    """
    merged = {k: v for k, v in (headers or {}).items() if k.lower() != "host"}
    merged["Host"] = target.host_header
    kwargs: dict[str, Any] = {"headers": merged, "follow_redirects": False}
    if target.sni_hostname is not None:
        kwargs["extensions"] = {"sni_hostname": target.sni_hostname}
    return kwargs


def make_client(timeout: float, *, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    """An httpx client for node calls: no redirects, no proxies or netrc from the environment.

    Connections are pooled by (scheme, IP, port), not by TLS name: share a client only among
    requests to one node.
    """
    return httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, verify=verify)


def refuse_redirect(response: httpx.Response) -> httpx.Response:
    """Raise on a 3xx answer from a node; returns the response otherwise."""
    if response.is_redirect or 300 <= response.status_code < 400:
        raise NodeRedirectRefusedError(
            f"the node answered HTTP {response.status_code} (redirects are not followed)",
            details={"status": response.status_code},
        )
    return response


def _parse(url: object) -> tuple[str, str, int, str]:
    """Split a URL into (scheme, host, port, path); host lowercase, without trailing dot."""
    if not isinstance(url, str) or not url:
        raise _refuse("invalid_url")
    if len(url) > MAX_URL_LENGTH:
        raise _refuse("url_too_long")
    for ch in url:
        # Parsers strip or drop some of these (WHATWG removes tabs and newlines anywhere).
        if ch <= " " or ch == "\x7f" or ch == "\\" or ch.isspace():
            raise _refuse("invalid_characters")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Zs"):
            raise _refuse("invalid_characters")
    match = _SCHEME.match(url)
    if match is None:
        raise _refuse("scheme_not_allowed")
    scheme = match.group()[:-1].lower()
    if scheme not in DEFAULT_PORTS:
        raise _refuse("scheme_not_allowed")
    rest = url[match.end() :]
    if not rest.startswith("//") or rest[2:3] in ("", "/", "?", "#"):
        raise _refuse("missing_host")  # browsers read http:/h and http:///h as http://h
    if "#" in rest:
        raise _refuse("fragment_not_allowed")
    end = len(rest)
    for sep in "/?":
        i = rest.find(sep, 2)
        if i != -1:
            end = min(end, i)
    authority, tail = rest[2:end], rest[end:]
    if "@" in authority:
        raise _refuse("credentials_in_url")
    if "?" in tail:
        raise _refuse("query_not_allowed")
    if not tail.isascii():
        raise _refuse("invalid_characters")
    host, port_text = _split_host_port(authority)
    port = DEFAULT_PORTS[scheme]
    if port_text is not None:
        if not (port_text.isdigit() and port_text.isascii() and len(port_text) <= 5):
            raise _refuse("invalid_port")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise _refuse("invalid_port")
    return scheme, host, port, tail


def _split_host_port(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise _refuse("invalid_host")
        inner, after = authority[1:close], authority[close + 1 :]
        if after and not after.startswith(":"):
            raise _refuse("invalid_host")
        if "%" in inner:
            raise _refuse("zone_id_not_allowed")
        if not inner.isascii():
            raise _refuse("non_ascii_host")
        try:
            addr = ipaddress.IPv6Address(inner)
        except ValueError:
            raise _refuse("invalid_host") from None
        return f"[{addr}]", (after[1:] if after else None)
    host, sep, port_text = authority.partition(":")
    if ":" in port_text:
        raise _refuse("invalid_host")  # an unbracketed IPv6 address, or two ports
    if not host.isascii():
        raise _refuse("non_ascii_host")
    if "%" in host:
        raise _refuse("percent_encoded_host")
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise _refuse("missing_host")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise _refuse("invalid_host")
    return host, (port_text if sep else None)


def _ip_literal(host: str) -> IPAddress | None:
    """The address a host denotes if resolvers or browsers read it as an IP literal."""
    if host.startswith("["):
        return ipaddress.IPv6Address(host[1:-1])
    parts = host.split(".")
    # WHATWG: a host whose last label is a number is an IPv4 address or invalid; glibc's
    # inet_aton (used by getaddrinfo) reads the same 1-4 part decimal/octal/hex forms.
    if not _NUMBER.fullmatch(parts[-1]):
        return None
    if len(parts) > 4 or not all(_NUMBER.fullmatch(p) for p in parts):
        raise _refuse("invalid_host")
    try:
        numbers = [_inet_aton_part(p) for p in parts]
    except ValueError:
        raise _refuse("invalid_host") from None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise _refuse("invalid_host")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _inet_aton_part(part: str) -> int:
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part[1:], 8)
    return int(part, 10)


def _embedded_ipv4(addr: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """IPv4 addresses that an IPv6 address carries (compatible, SIIT, 6to4, NAT64, Teredo)."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return ()
    packed = addr.packed
    found: list[ipaddress.IPv4Address] = []
    if addr in _IPV4_COMPATIBLE and int(addr) > 1:
        found.append(ipaddress.IPv4Address(packed[12:]))
    if addr in _IPV4_TRANSLATED or addr in _NAT64_WELL_KNOWN:
        found.append(ipaddress.IPv4Address(packed[12:]))
    if addr in _NAT64_LOCAL:
        found.append(ipaddress.IPv4Address(packed[6:8] + packed[9:11]))  # skips the u octet
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found.extend(addr.teredo)
    return tuple(found)


def _always_refused(addr: IPAddress) -> str | None:
    if addr in _METADATA:
        return "metadata_address"
    for net, reason in _ALWAYS_REFUSED:
        if addr in net:
            return reason
    return None
