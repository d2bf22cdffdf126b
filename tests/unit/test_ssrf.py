"""Node URLs reach only what they may: every notation, every resolved address, no redirect."""

from __future__ import annotations

import datetime as dt
import http.server
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from charter.errors import ConfigurationError, ValidationFailedError
from charter.nodes.ssrf import (
    REASONS,
    NodeRedirectRefusedError,
    NodeUrlPolicy,
    NodeUrlRefusedError,
    make_client,
    pinned_request_kwargs,
    refuse_redirect,
)

_real_getaddrinfo = socket.getaddrinfo


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A fake resolver for made-up names; `localhost` and IP literals go to the real one."""
    table: dict[str, list[str]] = {}

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host in table:
            out = []
            for ip in table[host]:
                if ":" in ip:
                    out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
                else:
                    out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
            return out
        if host == "localhost" or (isinstance(host, str) and host[:1].isdigit()):
            return _real_getaddrinfo(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return table


@pytest.fixture
def policy(dns: dict[str, list[str]]) -> NodeUrlPolicy:
    return NodeUrlPolicy(allowed_networks=["10.0.0.0/8", "fc00::/7"])


def _reason(policy: NodeUrlPolicy, url: str) -> str:
    with pytest.raises(NodeUrlRefusedError) as info:
        policy.validate(url)
    err = info.value
    assert err.status == 422 and err.code == "node_url_refused"
    assert err.details["reason"] in REASONS
    return str(err.details["reason"])


REFUSED = [
    # loopback, in every notation, when not allowlisted
    ("http://127.0.0.1/", "address_not_allowed"),
    ("http://127.0.0.1:8080/", "address_not_allowed"),
    ("http://127.1/", "address_not_allowed"),
    ("http://127.0.1/", "address_not_allowed"),
    ("http://2130706433/", "address_not_allowed"),
    ("http://0177.0.0.1/", "address_not_allowed"),
    ("http://0x7f.0.0.1/", "address_not_allowed"),
    ("http://0x7f000001/", "address_not_allowed"),
    ("http://017700000001/", "address_not_allowed"),
    ("http://0x7f.1/", "address_not_allowed"),
    ("http://0X7F.0.0.1/", "address_not_allowed"),
    ("http://127.0.0.1./", "address_not_allowed"),
    ("http://[::1]/", "address_not_allowed"),
    ("http://[0:0:0:0:0:0:0:1]/", "address_not_allowed"),
    ("http://[::ffff:127.0.0.1]/", "address_not_allowed"),
    ("http://[::ffff:7f00:1]/", "address_not_allowed"),
    ("http://[0:0:0:0:0:FFFF:7F00:0001]/", "address_not_allowed"),
    ("http://[::127.0.0.1]/", "address_not_allowed"),  # IPv4-compatible
    ("http://[::ffff:0:7f00:1]/", "address_not_allowed"),  # SIIT IPv4-translated
    ("http://[2002:7f00:1::]/", "address_not_allowed"),  # 6to4
    ("http://[64:ff9b::7f00:1]/", "address_not_allowed"),  # NAT64
    ("http://localhost/", "address_not_allowed"),  # real resolver: 127.0.0.1
    ("http://LOCALHOST./", "address_not_allowed"),
    # unspecified
    ("http://0.0.0.0/", "unspecified_address"),
    ("http://0/", "unspecified_address"),
    ("http://0x0/", "unspecified_address"),
    ("http://[::]/", "unspecified_address"),
    ("http://[::ffff:0.0.0.0]/", "unspecified_address"),
    # cloud metadata, in every notation; fd00:ec2::254 despite fc00::/7 being allowed
    ("http://169.254.169.254/", "metadata_address"),
    ("http://169.254.169.254./latest/meta-data/", "metadata_address"),
    ("http://2852039166/", "metadata_address"),
    ("http://0251.0376.0251.0376/", "metadata_address"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "metadata_address"),
    ("http://0xa9fea9fe/", "metadata_address"),
    ("http://169.254.43518/", "metadata_address"),
    ("http://[::ffff:169.254.169.254]/", "metadata_address"),
    ("http://[::ffff:a9fe:a9fe]/", "metadata_address"),
    ("http://[2002:a9fe:a9fe::]/", "metadata_address"),
    ("http://[64:ff9b::a9fe:a9fe]/", "metadata_address"),
    ("http://[64:ff9b:1:a9fe:a9:fe00::]/", "metadata_address"),  # RFC 8215 /48 layout
    ("http://169.254.170.2/", "metadata_address"),
    ("http://[fd00:ec2::254]/", "metadata_address"),
    ("http://100.100.100.200/", "metadata_address"),
    # link-local
    ("http://169.254.1.1/", "link_local"),
    ("http://[fe80::1]/", "link_local"),
    ("http://[::ffff:169.254.1.1]/", "link_local"),
    ("http://[fe80::1%25eth0]/", "zone_id_not_allowed"),
    ("http://[fc00::1%25eth0]/", "zone_id_not_allowed"),
    # multicast, broadcast, reserved
    ("http://224.0.0.1/", "multicast_address"),
    ("http://[ff02::1]/", "multicast_address"),
    ("http://255.255.255.255/", "broadcast_address"),
    ("http://4294967295/", "broadcast_address"),
    ("http://240.0.0.1/", "reserved_address"),
    # public, or private but not allowlisted
    ("http://8.8.8.8/", "address_not_allowed"),
    ("http://192.168.1.10/", "address_not_allowed"),
    ("http://[2001:db8::1]/", "address_not_allowed"),
    ("http://[::10.0.0.5]/", "address_not_allowed"),  # compatible form is not 10.0.0.5
    # credentials
    ("http://user:pass@10.0.0.5/", "credentials_in_url"),
    ("http://10.0.0.5@127.0.0.1/", "credentials_in_url"),
    ("http://user@10.0.0.5/", "credentials_in_url"),
    ("http://@10.0.0.5/", "credentials_in_url"),
    ("http://10.0.0.5:80@127.0.0.1/", "credentials_in_url"),
    # schemes
    ("file:///etc/passwd", "scheme_not_allowed"),
    ("gopher://10.0.0.5:70/_GET", "scheme_not_allowed"),
    ("ftp://10.0.0.5/", "scheme_not_allowed"),
    ("dict://10.0.0.5:11211/", "scheme_not_allowed"),
    ("javascript:alert(1)", "scheme_not_allowed"),
    ("data:text/plain,hi", "scheme_not_allowed"),
    ("//10.0.0.5/", "scheme_not_allowed"),
    ("10.0.0.5:8080", "scheme_not_allowed"),
    ("", "invalid_url"),
    ("http:/10.0.0.5/", "missing_host"),
    ("http:///10.0.0.5/", "missing_host"),
    ("http://", "missing_host"),
    ("http://:8080/", "missing_host"),
    # backslashes, whitespace, control and invisible characters
    ("http://10.0.0.5\\@127.0.0.1/", "invalid_characters"),
    ("http:\\\\127.0.0.1\\", "invalid_characters"),
    (" http://10.0.0.5/", "invalid_characters"),
    ("http://10.0.0.5/\n", "invalid_characters"),
    ("http://12\t7.0.0.1/", "invalid_characters"),
    ("http://10.0.0.5/\x00", "invalid_characters"),
    ("http://10.0.0.5\r\nHost: x/", "invalid_characters"),
    ("http://10.0.0.5\u200b/", "invalid_characters"),
    ("http://10.0.0.5\u00a0/", "invalid_characters"),
    ("http://10.0.0.5/caf\u00e9", "invalid_characters"),
    # unicode and IDNA hosts (Python's resolver maps ①②⑦.0.0.1 to 127.0.0.1)
    ("http://\u2460\u2461\u2466.0.0.1/", "non_ascii_host"),
    ("http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/", "non_ascii_host"),
    ("http://127\u30020\u30020\u30021/", "non_ascii_host"),
    ("http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3/", "non_ascii_host"),
    ("http://ex\u0430mple.com/", "non_ascii_host"),  # Cyrillic a
    # percent-encoding in the host
    ("http://%31%32%37.0.0.1/", "percent_encoded_host"),
    ("http://10.0.0.5%2f/", "percent_encoded_host"),
    # ports
    ("http://10.0.0.5:0/", "invalid_port"),
    ("http://10.0.0.5:70000/", "invalid_port"),
    ("http://10.0.0.5:/", "invalid_port"),
    ("http://10.0.0.5:-1/", "invalid_port"),
    ("http://10.0.0.5:80a/", "invalid_port"),
    ("http://10.0.0.5:000080/", "invalid_port"),
    ("http://[fc00::1]:0/", "invalid_port"),
    # fragment, query
    ("http://10.0.0.5/#x", "fragment_not_allowed"),
    ("http://10.0.0.5#@127.0.0.1/", "fragment_not_allowed"),
    ("http://10.0.0.5/v1?next=http://127.0.0.1/", "query_not_allowed"),
    # malformed hosts
    ("http://08.0.0.1/", "invalid_host"),
    ("http://256.0.0.1/", "invalid_host"),
    ("http://1.2.3.4.5/", "invalid_host"),
    ("http://node.123/", "invalid_host"),
    ("http://4294967296/", "invalid_host"),
    ("http://::1/", "invalid_host"),
    ("http://[127.0.0.1]/", "invalid_host"),
    ("http://[::1/", "invalid_host"),
    ("http://[::1]x/", "invalid_host"),
    ("http://[::ffff:0x7f.1]/", "invalid_host"),
    ("http://-node.example/", "invalid_host"),
    ("http://a..b/", "invalid_host"),
    ("http://10.0.0.5:80:80/", "invalid_host"),
    # allowed addresses in ambiguous notation: 012 is octal 10 to a resolver, 12 to a person
    ("http://012.0.0.5/", "non_canonical_ip"),
    ("http://167772165/", "non_canonical_ip"),
    ("http://10.5/", "non_canonical_ip"),
    # names that do not resolve, or resolve badly (see the fake resolver table)
    ("http://nowhere.invalid/", "unresolvable"),
    ("http://10.0.0.5/" + "a" * 600, "url_too_long"),
]


def test_there_are_enough_distinct_payloads() -> None:
    assert len({url for url, _ in REFUSED}) == len(REFUSED) >= 45


@pytest.mark.parametrize(("url", "reason"), REFUSED, ids=[repr(u)[:60] for u, _ in REFUSED])
def test_refused_with_reason(policy: NodeUrlPolicy, url: str, reason: str) -> None:
    assert _reason(policy, url) == reason


def test_refusal_is_a_validation_error_that_never_echoes_the_url(policy: NodeUrlPolicy) -> None:
    with pytest.raises(ValidationFailedError) as info:
        policy.validate("http://admin:s3cr3t-t0ken@10.0.0.5/")
    err = info.value
    assert isinstance(err, NodeUrlRefusedError)
    assert err.details == {"reason": "credentials_in_url"}
    for text in (str(err), repr(err), err.message, repr(err.details)):
        assert "s3cr3t" not in text and "admin" not in text and "10.0.0.5" not in text


def test_a_name_resolving_to_metadata_is_refused(
    policy: NodeUrlPolicy, dns: dict[str, list[str]]
) -> None:
    dns["imds.node.test"] = ["169.254.169.254"]
    assert _reason(policy, "http://imds.node.test/") == "metadata_address"


def test_every_resolved_address_must_pass(
    policy: NodeUrlPolicy, dns: dict[str, list[str]]
) -> None:
    dns["mixed.node.test"] = ["10.0.0.5", "127.0.0.1"]
    assert _reason(policy, "http://mixed.node.test:8080/") == "address_not_allowed"
    dns["mixed6.node.test"] = ["fc00::5", "fe80::1"]
    assert _reason(policy, "http://mixed6.node.test/") == "link_local"
    dns["mapped.node.test"] = ["::ffff:169.254.169.254"]
    assert _reason(policy, "http://mapped.node.test/") == "metadata_address"


def test_name_resolving_to_nothing_is_unresolvable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    policy = NodeUrlPolicy(["10.0.0.0/8"])
    assert _reason(policy, "http://node.test/") == "unresolvable"


def test_hostnames_can_be_forbidden(dns: dict[str, list[str]]) -> None:
    dns["node.test"] = ["10.0.0.5"]
    policy = NodeUrlPolicy(["10.0.0.0/8"], allow_hostnames=False)
    assert _reason(policy, "http://node.test/") == "hostname_not_allowed"
    assert policy.validate("http://10.0.0.5/").is_ip


def test_allowlisting_everything_still_refuses_the_always_refused(dns: Any) -> None:
    policy = NodeUrlPolicy(["0.0.0.0/0", "::/0"])
    for url, reason in [
        ("http://169.254.169.254/", "metadata_address"),
        ("http://[fe80::1]/", "link_local"),
        ("http://0.0.0.0/", "unspecified_address"),
        ("http://[::]/", "unspecified_address"),
        ("http://239.1.1.1/", "multicast_address"),
        ("http://250.1.1.1/", "reserved_address"),
        ("http://[2002:a9fe:a9fe::1]/", "metadata_address"),
    ]:
        assert _reason(policy, url) == reason
    assert policy.validate("http://8.8.8.8/").host == "8.8.8.8"


def test_rebinding_between_validate_and_resolve_is_caught(
    policy: NodeUrlPolicy, dns: dict[str, list[str]]
) -> None:
    dns["rebind.node.test"] = ["10.0.0.5"]
    assert policy.validate("http://rebind.node.test/").addresses == ("10.0.0.5",)
    dns["rebind.node.test"] = ["169.254.169.254"]
    with pytest.raises(NodeUrlRefusedError) as info:
        policy.resolve("http://rebind.node.test/")
    assert info.value.details["reason"] == "metadata_address"
    dns["rebind.node.test"] = ["10.0.0.9", "127.0.0.1"]
    with pytest.raises(NodeUrlRefusedError):
        policy.resolve("http://rebind.node.test/")


def test_resolve_pins_the_address_it_checked_now(
    policy: NodeUrlPolicy, dns: dict[str, list[str]]
) -> None:
    dns["node.test"] = ["10.0.0.5"]
    stored = policy.validate("HTTPS://Node.Test.:8443/v1/").url
    assert stored == "https://node.test:8443/v1/"
    dns["node.test"] = ["10.0.0.7", "10.0.0.8"]
    target = policy.resolve(stored)
    assert target.ip == "10.0.0.7"
    assert target.url == "https://10.0.0.7:8443/v1"
    assert httpx.URL(target.url + "/health").host == "10.0.0.7"
    kwargs = pinned_request_kwargs(target, headers={"Authorization": "Bearer x", "host": "evil"})
    assert kwargs == {
        "headers": {"Authorization": "Bearer x", "Host": "node.test:8443"},
        "extensions": {"sni_hostname": "node.test"},
        "follow_redirects": False,
    }


@pytest.mark.parametrize(
    ("url", "canonical", "pinned", "host_header"),
    [
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080", "http://10.0.0.5:8080", "10.0.0.5:8080"),
        ("http://10.0.0.5:80/", "http://10.0.0.5/", "http://10.0.0.5:80", "10.0.0.5"),
        ("https://10.1.2.3:8443/api/", "https://10.1.2.3:8443/api/", "https://10.1.2.3:8443/api",
         "10.1.2.3:8443"),
        ("http://[FD12:3456::5]:8000/v1", "http://[fd12:3456::5]:8000/v1",
         "http://[fd12:3456::5]:8000/v1", "[fd12:3456::5]:8000"),
        ("https://[fc00::1]/", "https://[fc00::1]/", "https://[fc00::1]:443", "[fc00::1]"),
        ("http://[::ffff:10.0.0.5]/", "http://10.0.0.5/", "http://10.0.0.5:80", "10.0.0.5"),
    ],
)
def test_allowed_ip_urls(
    policy: NodeUrlPolicy, url: str, canonical: str, pinned: str, host_header: str
) -> None:
    validated = policy.validate(url)
    assert validated.url == canonical and validated.is_ip
    assert policy.validate(validated.url) == validated  # canonical form is stable
    target = policy.resolve(url)
    assert target.url == pinned and target.sni_hostname is None
    kwargs = pinned_request_kwargs(target)
    assert kwargs["headers"] == {"Host": host_header} and "extensions" not in kwargs
    assert httpx.URL(target.url).host == target.ip


def test_allowed_names(policy: NodeUrlPolicy, dns: dict[str, list[str]]) -> None:
    dns["gpu1.node.test"] = ["10.20.0.4", "fd00:1::4"]
    v = policy.validate("https://gpu1.node.test:8443")
    assert (v.host, v.port, v.is_ip, v.addresses) == (
        "gpu1.node.test", 8443, False, ("10.20.0.4", "fd00:1::4"))
    dns["v6only.node.test"] = ["fd00:1::5"]
    target = policy.resolve("http://v6only.node.test:8000/")
    assert target.url == "http://[fd00:1::5]:8000"
    assert pinned_request_kwargs(target) == {
        "headers": {"Host": "v6only.node.test:8000"}, "follow_redirects": False}


def test_loopback_only_when_allowlisted(dns: Any) -> None:
    demo = NodeUrlPolicy(["127.0.0.0/8", "::1/128"])
    assert demo.validate("http://127.0.0.1:8081/").host == "127.0.0.1"
    assert demo.validate("http://[::1]:8081/").host == "::1"
    assert demo.validate("http://localhost:8081/").addresses[0] in ("127.0.0.1", "::1")
    assert _reason(demo, "http://0177.0.0.1/") == "non_canonical_ip"
    assert _reason(demo, "http://169.254.169.254/") == "metadata_address"


def test_bad_networks_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        NodeUrlPolicy(["10.0.0.0/8", "10.0.0.5/8", "not-a-network"])
    assert len(info.value.details["problems"]) == 2
    assert NodeUrlPolicy("10.0.0.0/8, fc00::/7").allowed_networks[1].version == 6


# -- integration: a real HTTP server on 127.0.0.1 ------------------------------------------


class _Server:
    def __init__(self, handler: Callable[[http.server.BaseHTTPRequestHandler], None],
                 tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.requests.append((self.path, self.headers.get("Host", "")))
                handler(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _redirect_to_metadata(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(302)
    h.send_header("Location", "http://169.254.169.254/latest/meta-data/")
    h.send_header("Content-Length", "0")
    h.end_headers()


def _ok(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "2")
    h.end_headers()
    h.wfile.write(b"ok")


@pytest.fixture
def redirecting() -> Iterator[_Server]:
    server = _Server(_redirect_to_metadata)
    yield server
    server.close()


@pytest.fixture
def local_policy(dns: dict[str, list[str]]) -> NodeUrlPolicy:
    return NodeUrlPolicy(["127.0.0.0/8"])


def test_client_does_not_follow_a_redirect_to_metadata(
    local_policy: NodeUrlPolicy, redirecting: _Server
) -> None:
    target = local_policy.resolve(f"http://127.0.0.1:{redirecting.port}/")
    with make_client(2.0) as client:
        response = client.get(target.url + "/health", **pinned_request_kwargs(target))
        plain = client.get(target.url + "/plain")  # the client's own default, no kwargs
    assert response.status_code == 302 and plain.status_code == 302
    assert response.headers["location"].startswith("http://169.254.169.254/")
    assert redirecting.requests == [("/health", f"127.0.0.1:{redirecting.port}"),
                                    ("/plain", f"127.0.0.1:{redirecting.port}")]
    with pytest.raises(NodeRedirectRefusedError) as info:
        refuse_redirect(response)
    assert info.value.status == 502 and info.value.details == {"status": 302}


def test_pinned_kwargs_refuse_redirects_even_on_a_following_client(
    local_policy: NodeUrlPolicy, redirecting: _Server
) -> None:
    target = local_policy.resolve(f"http://127.0.0.1:{redirecting.port}")
    with httpx.Client(timeout=2.0, follow_redirects=True, trust_env=False) as client:
        response = client.get(target.url + "/v1/models", **pinned_request_kwargs(target))
    assert response.status_code == 302 and len(redirecting.requests) == 1


def test_client_ignores_proxies_from_the_environment(
    local_policy: NodeUrlPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _Server(_ok)
    try:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        target = local_policy.resolve(f"http://127.0.0.1:{server.port}")
        with httpx.Client(timeout=2.0) as trusting, pytest.raises(httpx.HTTPError):
            trusting.get(target.url + "/")  # control: the environment's proxy would be used
        with make_client(2.0) as client:
            assert client.get(target.url + "/", **pinned_request_kwargs(target)).text == "ok"
    finally:
        server.close()


def test_request_goes_to_the_checked_address_after_dns_changes(
    local_policy: NodeUrlPolicy, dns: dict[str, list[str]]
) -> None:
    server = _Server(_ok)
    try:
        dns["node.test"] = ["127.0.0.1"]
        target = local_policy.resolve(f"http://node.test:{server.port}/")
        dns["node.test"] = ["10.255.255.1"]  # rebound after the check: must not matter now
        with make_client(2.0) as client:
            response = client.get(target.url + "/info", **pinned_request_kwargs(target))
        assert response.text == "ok"
        assert server.requests == [("/info", f"node.test:{server.port}")]
        with pytest.raises(NodeUrlRefusedError):
            local_policy.resolve(f"http://node.test:{server.port}/")  # the next call sees it
    finally:
        server.close()


# -- TLS: the sni_hostname extension makes httpcore send and verify the original name ------


def _tls_material() -> tuple[bytes, bytes, bytes]:
    """A CA and a leaf certificate for DNS:node.test only (no IP SAN): (ca, cert, key) PEM."""
    x509 = pytest.importorskip("cryptography.x509", reason="cryptography builds the test CA")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def build(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False), critical=True)
            b = b.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("node.test")]), critical=False)
            b = b.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = build("Charter test CA", ca_key, "Charter test CA", ca_key, True)
    leaf = build("node.test", leaf_key, "Charter test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    return ca.public_bytes(pem), leaf.public_bytes(pem), key_pem


@pytest.fixture
def tls_node(tmp_path: Any) -> Iterator[tuple[_Server, ssl.SSLContext, list[str | None]]]:
    ca_pem, cert_pem, key_pem = _tls_material()
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    seen_sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: seen_sni.append(name)  # type: ignore[assignment]
    server = _Server(_ok, tls=server_ctx)
    client_ctx = ssl.create_default_context(cadata=ca_pem.decode())
    yield server, client_ctx, seen_sni
    server.close()


def test_sni_hostname_extension_verifies_the_original_name(
    local_policy: NodeUrlPolicy, dns: dict[str, list[str]],
    tls_node: tuple[_Server, ssl.SSLContext, list[str | None]],
) -> None:
    server, client_ctx, seen_sni = tls_node
    dns["node.test"] = ["127.0.0.1"]
    target = local_policy.resolve(f"https://node.test:{server.port}")
    assert target.url == f"https://127.0.0.1:{server.port}"
    with make_client(2.0, verify=client_ctx) as client:
        response = client.get(target.url + "/health", **pinned_request_kwargs(target))
    assert response.status_code == 200 and response.text == "ok"
    assert seen_sni == ["node.test"]
    assert server.requests == [("/health", f"node.test:{server.port}")]


def test_without_the_extension_the_certificate_does_not_match_the_ip(
    local_policy: NodeUrlPolicy, dns: dict[str, list[str]],
    tls_node: tuple[_Server, ssl.SSLContext, list[str | None]],
) -> None:
    server, client_ctx, _ = tls_node
    dns["node.test"] = ["127.0.0.1"]
    target = local_policy.resolve(f"https://node.test:{server.port}")
    kwargs = pinned_request_kwargs(target)
    del kwargs["extensions"]
    with make_client(2.0, verify=client_ctx) as client, pytest.raises(httpx.ConnectError) as info:
        client.get(target.url + "/health", **kwargs)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    kwargs["extensions"] = {"sni_hostname": "other.test"}  # the name is verified, not ignored
    with make_client(2.0, verify=client_ctx) as client, pytest.raises(httpx.ConnectError):
        client.get(target.url + "/health", **kwargs)
    assert server.requests == []
