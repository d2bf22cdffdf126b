"""AccessTokenVerifier against a real HTTP identity provider stub serving discovery and JWKS."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey

from charter.errors import ConfigurationError, UnauthenticatedError
from charter.identity.jwt import JWKS_MAX_AGE_S, MAX_DOCUMENT_BYTES, AccessTokenVerifier
from charter.settings import Settings

AUDIENCE = "charter-api"
MIN_REFRESH_S = 60.0
DISCOVERY_PATH = "/realms/charter/.well-known/openid-configuration"
JWKS_PATH = "/realms/charter/protocol/openid-connect/certs"


# -- a real HTTP identity provider ------------------------------------------------------------


class IdP:
    """Serves a discovery document and a JWKS on 127.0.0.1; counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.hits: Counter[str] = Counter()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                idp.hits[self.path] += 1
                status, body, headers = idp.routes.get(self.path, (404, b"{}", {}))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.issuer = self.base + "/realms/charter"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()
        self.serve_discovery()

    def serve_discovery(self, **overrides: Any) -> None:
        doc = {"issuer": self.issuer, "jwks_uri": self.base + JWKS_PATH, **overrides}
        self.routes[DISCOVERY_PATH] = (200, json.dumps(doc).encode(), {})

    def serve_keys(self, *keys: Key, extra: list[dict[str, Any]] | None = None) -> None:
        entries = [k.as_dict(private=False) for k in keys] + (extra or [])
        self.serve_raw(json.dumps({"keys": entries}).encode())

    def serve_raw(self, body: bytes, status: int = 200, **headers: str) -> None:
        self.routes[JWKS_PATH] = (status, body, headers)

    @property
    def jwks_hits(self) -> int:
        return self.hits[JWKS_PATH]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeClock:
    """Monotonic clock of the JWKS rate limit, moved by the test instead of by sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


@pytest.fixture(scope="module")
def rsa_key_2() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "ec-1"})


@pytest.fixture(scope="module")
def attacker_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})  # same kid as the real one


@pytest.fixture
def idp(rsa_key: RSAKey, ec_key: ECKey) -> Iterator[IdP]:
    server = IdP()
    server.serve_keys(rsa_key, ec_key)
    yield server
    server.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_settings(issuer: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "oidc_issuer": issuer, "oidc_audience": AUDIENCE,
        "oidc_jwks_min_refresh_s": MIN_REFRESH_S, "oidc_http_timeout_s": 2.0,
    }
    values.update(overrides)
    # Built directly: the verifier needs only these fields, not a whole deployable config.
    return Settings(**values)


@pytest.fixture
def verifier(idp: IdP, clock: FakeClock) -> AccessTokenVerifier:
    return AccessTokenVerifier(make_settings(idp.issuer), clock=clock)


# -- minting -------------------------------------------------------------------------------------


def claims_for(issuer: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer, "sub": "user-42", "aud": AUDIENCE, "iat": now, "nbf": now,
        "exp": now + 300, "scope": "charter:read", "client_id": "helpdesk",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def mint(key: Key, claims: dict[str, Any], alg: str = "RS256", **header: Any) -> str:
    """A token signed by joserfc itself (the honest path)."""
    head = {"alg": alg, "kid": key.kid, "typ": "at+jwt", **header}
    head = {k: v for k, v in head.items() if v is not None}
    return jwt.encode(head, claims, key, algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: Any, sign: Callable[[bytes], bytes] | None) -> str:
    """A token put together by hand, for what joserfc refuses to sign."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(payload).encode()) if not isinstance(payload, bytes) else b64(payload)
    signing_input = f"{head}.{body}".encode()
    signature = b64(sign(signing_input)) if sign else ""
    return f"{head}.{body}.{signature}"


def signer(key: Key, alg: str = "RS256") -> Callable[[bytes], bytes]:
    algorithm = jws.JWSRegistry.algorithms[alg]
    return lambda data: algorithm.sign(data, key)


def hs256(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


def refused(verifier: AccessTokenVerifier, token: str) -> str:
    """The error code of a refused token; the message never quotes the token."""
    with pytest.raises(UnauthenticatedError) as info:
        verifier.verify(token)
    text = info.value.message + json.dumps(info.value.details)
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in text
    return info.value.code


# -- accepted tokens -----------------------------------------------------------------------------


def test_valid_rs256_at_jwt(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    claims = verifier.verify(mint(rsa_key, claims_for(idp.issuer)))
    assert claims["sub"] == "user-42"
    assert claims["scope"] == "charter:read"


def test_valid_es256(verifier: AccessTokenVerifier, idp: IdP, ec_key: ECKey) -> None:
    token = mint(ec_key, claims_for(idp.issuer), alg="ES256")
    assert verifier.verify(token)["sub"] == "user-42"


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
def test_valid_eddsa(idp: IdP, clock: FakeClock) -> None:
    ed_key = OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})
    idp.serve_keys(ed_key)
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    token = mint(ed_key, claims_for(idp.issuer), alg="EdDSA")
    assert verifier.verify(token)["sub"] == "user-42"


def test_valid_keycloak_bearer_typ_claim(verifier: AccessTokenVerifier, idp: IdP,
                                         rsa_key: RSAKey) -> None:
    # Keycloak before 25 also copies the login nonce into access tokens.
    claims = claims_for(idp.issuer, typ="Bearer", nonce="n-1", azp="console")
    assert verifier.verify(mint(rsa_key, claims, typ="JWT"))["azp"] == "console"


def test_valid_okta_style_without_any_typ(verifier: AccessTokenVerifier, idp: IdP,
                                          rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, cid="0oa1", scp=["charter"]), typ=None)
    assert verifier.verify(token)["cid"] == "0oa1"


def test_valid_entra_style_extra_header_parameters(verifier: AccessTokenVerifier, idp: IdP,
                                                   rsa_key: RSAKey) -> None:
    header = {"alg": "RS256", "kid": "rsa-1", "typ": "JWT", "x5t": "abc", "custom": 1}
    token = craft(header, claims_for(idp.issuer, ver="2.0"), signer(rsa_key))
    assert verifier.verify(token)["ver"] == "2.0"


def test_media_type_form_of_at_jwt_accepted(verifier: AccessTokenVerifier, idp: IdP,
                                            rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer), typ="application/AT+JWT")
    assert verifier.verify(token)["sub"] == "user-42"


def test_audience_list_containing_ours_accepted(verifier: AccessTokenVerifier, idp: IdP,
                                                rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, aud=["account", AUDIENCE]))
    assert verifier.verify(token)["aud"] == ["account", AUDIENCE]


def test_expired_within_leeway_accepted(verifier: AccessTokenVerifier, idp: IdP,
                                        rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, exp=int(time.time()) - 10))  # leeway 30
    assert verifier.verify(token)["sub"] == "user-42"


# -- algorithm and header attacks --------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_casing(verifier: AccessTokenVerifier, idp: IdP, alg: str) -> None:
    token = craft({"alg": alg, "kid": "rsa-1", "typ": "at+jwt"}, claims_for(idp.issuer), None)
    assert refused(verifier, token) == "alg_not_allowed"
    assert idp.jwks_hits == 0  # decided before any key lookup


def test_hs256_keyed_with_the_public_key_pem(verifier: AccessTokenVerifier, idp: IdP,
                                             rsa_key: RSAKey) -> None:
    pem = rsa_key.as_pem(private=False)
    token = craft({"alg": "HS256", "kid": "rsa-1", "typ": "at+jwt"}, claims_for(idp.issuer),
                  hs256(pem))
    assert refused(verifier, token) == "alg_not_allowed"
    assert idp.jwks_hits == 0


def test_hs256_with_empty_key(verifier: AccessTokenVerifier, idp: IdP) -> None:
    token = craft({"alg": "HS256", "kid": "rsa-1"}, claims_for(idp.issuer), hs256(b""))
    assert refused(verifier, token) == "alg_not_allowed"


def test_algorithm_outside_the_allowlist(verifier: AccessTokenVerifier, idp: IdP,
                                         rsa_key: RSAKey) -> None:
    token = craft({"alg": "RS384", "kid": "rsa-1", "typ": "at+jwt"}, claims_for(idp.issuer),
                  signer(rsa_key, "RS384"))
    assert refused(verifier, token) == "alg_not_allowed"


def test_jwks_oct_key_and_hs256_with_its_secret(idp: IdP, clock: FakeClock,
                                                rsa_key: RSAKey) -> None:
    secret = b"s" * 32
    oct_entry = {"kty": "oct", "kid": "hmac-1", "k": b64(secret)}
    idp.serve_keys(rsa_key, extra=[oct_entry])
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    hs_token = craft({"alg": "HS256", "kid": "hmac-1", "typ": "at+jwt"},
                     claims_for(idp.issuer), hs256(secret))
    assert refused(verifier, hs_token) == "alg_not_allowed"
    # The oct key is not even loaded: its kid is unknown to an allowed algorithm.
    rs_token = craft({"alg": "RS256", "kid": "hmac-1", "typ": "at+jwt"},
                     claims_for(idp.issuer), signer(rsa_key))
    assert refused(verifier, rs_token) == "kid_unknown"


@pytest.mark.parametrize("algorithms", ["RS256,HS256", "RS256,hs256", "RS256,None", "XYZ"])
def test_hmac_none_or_unknown_algorithms_cannot_be_configured(idp: IdP, algorithms: str) -> None:
    settings = Settings(oidc_issuer=idp.issuer, oidc_audience=AUDIENCE,
                        oidc_algorithms=algorithms)
    with pytest.raises(ConfigurationError):
        AccessTokenVerifier(settings)


def test_rs256_header_with_an_ec_key_kid(verifier: AccessTokenVerifier, idp: IdP,
                                         rsa_key: RSAKey) -> None:
    token = craft({"alg": "RS256", "kid": "ec-1", "typ": "at+jwt"}, claims_for(idp.issuer),
                  signer(rsa_key))
    assert refused(verifier, token) == "key_type_mismatch"


def test_es256_header_with_an_rsa_key_kid(verifier: AccessTokenVerifier, idp: IdP,
                                          ec_key: ECKey) -> None:
    token = craft({"alg": "ES256", "kid": "rsa-1", "typ": "at+jwt"}, claims_for(idp.issuer),
                  signer(ec_key, "ES256"))
    assert refused(verifier, token) == "key_type_mismatch"


def test_key_published_for_another_alg(idp: IdP, clock: FakeClock, rsa_key: RSAKey) -> None:
    entry = {**rsa_key.as_dict(private=False), "alg": "PS256"}
    idp.serve_raw(json.dumps({"keys": [entry]}).encode())
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    assert refused(verifier, mint(rsa_key, claims_for(idp.issuer))) == "key_type_mismatch"


def _forbidden_headers(attacker: RSAKey) -> dict[str, dict[str, Any]]:
    return {
        "jku": {"jku": "https://attacker.example/jwks.json"},
        "jwk": {"jwk": attacker.as_dict(private=False)},
        "x5u": {"x5u": "https://attacker.example/cert.pem"},
        "x5c": {"x5c": [b64(b"not really a certificate")]},
        "crit": {"crit": ["exp"], "exp": 1},
        "b64": {"b64": False},
    }


@pytest.mark.parametrize("name", ["jku", "jwk", "x5u", "x5c", "crit", "b64"])
def test_header_naming_its_own_key_or_url(verifier: AccessTokenVerifier, idp: IdP,
                                          attacker_key: RSAKey, name: str) -> None:
    header = {"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt",
              **_forbidden_headers(attacker_key)[name]}
    token = craft(header, claims_for(idp.issuer), signer(attacker_key))
    assert refused(verifier, token) == "header_forbidden"
    assert idp.jwks_hits == 0


# -- signatures ----------------------------------------------------------------------------------


def test_signature_of_another_key_with_the_same_kid(verifier: AccessTokenVerifier, idp: IdP,
                                                    attacker_key: RSAKey) -> None:
    token = mint(attacker_key, claims_for(idp.issuer))
    assert refused(verifier, token) == "signature_invalid"


def test_tampered_payload(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    head, _, signature = mint(rsa_key, claims_for(idp.issuer)).split(".")
    forged = b64(json.dumps(claims_for(idp.issuer, sub="admin")).encode())
    assert refused(verifier, f"{head}.{forged}.{signature}") == "signature_invalid"


def test_empty_signature(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    head, body, _ = mint(rsa_key, claims_for(idp.issuer)).split(".")
    assert refused(verifier, f"{head}.{body}.") == "signature_invalid"


# -- structure ----------------------------------------------------------------------------------


def test_oversized_token(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, padding="x" * 9000))
    assert refused(verifier, token) == "token_too_large"


@pytest.mark.parametrize("token", [
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0",  # two parts
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln.c2ln",  # four parts
    "!!!.@@@.###",  # not base64url
    "eyJhbGciOiJSUzI1NiJ9=.eyJzdWIiOiJ4In0.c2ln",  # padding
    "a.eyJzdWIiOiJ4In0.c2ln",  # impossible base64 length
    "",
])
def test_not_a_three_part_base64url_token(verifier: AccessTokenVerifier, token: str) -> None:
    assert refused(verifier, token) == "token_malformed"


def test_header_not_json(verifier: AccessTokenVerifier, idp: IdP) -> None:
    token = f"{b64(b'{alg: RS256')}.{b64(json.dumps(claims_for(idp.issuer)).encode())}.c2ln"
    assert refused(verifier, token) == "token_malformed"


def test_header_with_duplicate_alg(verifier: AccessTokenVerifier, idp: IdP) -> None:
    raw = b'{"alg":"RS256","alg":"none","kid":"rsa-1"}'
    token = f"{b64(raw)}.{b64(json.dumps(claims_for(idp.issuer)).encode())}.c2ln"
    assert refused(verifier, token) == "token_malformed"


def test_header_alg_of_wrong_type(verifier: AccessTokenVerifier, idp: IdP) -> None:
    token = craft({"alg": ["RS256"], "kid": "rsa-1"}, claims_for(idp.issuer), None)
    assert refused(verifier, token) == "token_malformed"


@pytest.mark.parametrize("payload", [["not", "an", "object"], "a string", 42, b"\xff\xfe"])
def test_payload_not_a_json_object(verifier: AccessTokenVerifier, rsa_key: RSAKey,
                                   payload: Any) -> None:
    token = craft({"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt"}, payload, signer(rsa_key))
    assert refused(verifier, token) == "token_malformed"


# -- keys: kid, refresh, rotation -------------------------------------------------------------


def test_missing_kid(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    token = craft({"alg": "RS256", "typ": "at+jwt"}, claims_for(idp.issuer), signer(rsa_key))
    assert refused(verifier, token) == "kid_missing"
    assert idp.jwks_hits == 0


def test_unknown_kid(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    token = craft({"alg": "RS256", "kid": "nobody", "typ": "at+jwt"}, claims_for(idp.issuer),
                  signer(rsa_key))
    assert refused(verifier, token) == "kid_unknown"


def test_unknown_kids_refresh_the_jwks_at_most_once_per_interval(
        verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey, clock: FakeClock) -> None:
    def random_kid(kid: str) -> str:
        return craft({"alg": "RS256", "kid": kid, "typ": "at+jwt"}, claims_for(idp.issuer),
                     signer(rsa_key))

    verifier.verify(mint(rsa_key, claims_for(idp.issuer)))
    assert idp.jwks_hits == 1
    clock.advance(MIN_REFRESH_S + 1)
    assert refused(verifier, random_kid("k-1")) == "kid_unknown"
    assert idp.jwks_hits == 2  # the unknown kid refreshed once
    assert refused(verifier, random_kid("k-2")) == "kid_unknown"
    assert refused(verifier, random_kid("k-3")) == "kid_unknown"
    assert idp.jwks_hits == 2  # ...and not again within the interval
    clock.advance(MIN_REFRESH_S + 1)
    assert refused(verifier, random_kid("k-4")) == "kid_unknown"
    assert idp.jwks_hits == 3
    assert idp.hits[DISCOVERY_PATH] == 1  # discovery is fetched once


def test_concurrent_unknown_kids_fetch_once(verifier: AccessTokenVerifier, idp: IdP,
                                            rsa_key: RSAKey) -> None:
    tokens = [craft({"alg": "RS256", "kid": f"flood-{i}", "typ": "at+jwt"},
                    claims_for(idp.issuer), signer(rsa_key)) for i in range(16)]
    codes: list[str] = []
    lock = threading.Lock()

    def attempt(token: str) -> None:
        try:
            verifier.verify(token)
        except UnauthenticatedError as exc:
            with lock:
                codes.append(exc.code)

    threads = [threading.Thread(target=attempt, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == ["kid_unknown"] * 16
    assert idp.jwks_hits == 1


def test_rotated_key_accepted_without_restart(verifier: AccessTokenVerifier, idp: IdP,
                                              rsa_key: RSAKey, rsa_key_2: RSAKey,
                                              clock: FakeClock) -> None:
    assert verifier.verify(mint(rsa_key, claims_for(idp.issuer)))
    idp.serve_keys(rsa_key, rsa_key_2)  # the IdP publishes a new key
    clock.advance(MIN_REFRESH_S + 1)
    assert verifier.verify(mint(rsa_key_2, claims_for(idp.issuer)))["sub"] == "user-42"
    assert verifier.verify(mint(rsa_key, claims_for(idp.issuer)))["sub"] == "user-42"
    assert idp.jwks_hits == 2


def test_removed_old_key_refused_after_refresh(verifier: AccessTokenVerifier, idp: IdP,
                                               rsa_key: RSAKey, rsa_key_2: RSAKey,
                                               clock: FakeClock) -> None:
    old = mint(rsa_key, claims_for(idp.issuer))
    assert verifier.verify(old)
    idp.serve_keys(rsa_key_2)
    clock.advance(MIN_REFRESH_S + 1)
    assert verifier.verify(mint(rsa_key_2, claims_for(idp.issuer)))  # refresh by unknown kid
    assert refused(verifier, old) == "kid_unknown"


def test_keys_older_than_max_age_are_refetched(verifier: AccessTokenVerifier, idp: IdP,
                                               rsa_key: RSAKey, ec_key: ECKey,
                                               clock: FakeClock) -> None:
    token = mint(rsa_key, claims_for(idp.issuer))
    assert verifier.verify(token)
    idp.serve_keys(ec_key)  # the RSA key is revoked, no new kid shows up
    clock.advance(JWKS_MAX_AGE_S + 1)
    assert refused(verifier, token) == "kid_unknown"
    assert idp.jwks_hits == 2


@pytest.mark.filterwarnings("ignore:Key size should be")
def test_small_rsa_keys_in_the_jwks_are_ignored(idp: IdP, clock: FakeClock) -> None:
    weak = RSAKey.generate_key(1024, parameters={"kid": "weak"}, auto_kid=False)
    idp.serve_keys(weak, ECKey.generate_key("P-256", parameters={"kid": "ec-x"}))
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    assert refused(verifier, mint(weak, claims_for(idp.issuer))) == "kid_unknown"


# -- claims -------------------------------------------------------------------------------------


def test_expired(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, exp=int(time.time()) - 120))
    assert refused(verifier, token) == "token_expired"


def test_nbf_in_the_future(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, nbf=int(time.time()) + 120))
    assert refused(verifier, token) == "token_not_yet_valid"


def test_iat_far_in_the_future(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    now = int(time.time())
    token = mint(rsa_key, claims_for(idp.issuer, iat=now + 3600, exp=now + 7200))
    assert refused(verifier, token) == "token_not_yet_valid"


def test_wrong_issuer(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for("https://evil.example/realms/charter"))
    assert refused(verifier, token) == "issuer_invalid"


def test_issuer_with_trailing_slash(verifier: AccessTokenVerifier, idp: IdP,
                                    rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer + "/"))
    assert refused(verifier, token) == "issuer_invalid"


def test_wrong_audience(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, aud="another-api"))
    assert refused(verifier, token) == "audience_invalid"


def test_audience_list_without_ours(verifier: AccessTokenVerifier, idp: IdP,
                                    rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, aud=["account", "charter-ap"]))
    assert refused(verifier, token) == "audience_invalid"


@pytest.mark.parametrize("claim", ["sub", "exp", "iss", "aud"])
def test_missing_required_claim(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey,
                                claim: str) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, **{claim: None}))
    assert refused(verifier, token) == "claims_missing"


def test_empty_subject(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey) -> None:
    assert refused(verifier, mint(rsa_key, claims_for(idp.issuer, sub=""))) == "claims_missing"


@pytest.mark.parametrize("claims", [{"exp": "tomorrow"}, {"exp": True}, {"aud": 7},
                                    {"sub": 42}, {"nbf": "now"}])
def test_claim_of_the_wrong_type(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey,
                                 claims: dict[str, Any]) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, **claims))
    assert refused(verifier, token) == "token_malformed"


# -- token type ---------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", [{"nonce": "n-1"}, {"at_hash": "aGFzaA"},
                                    {"c_hash": "aGFzaA"}, {"typ": "ID"}])
def test_id_token_used_as_access_token(verifier: AccessTokenVerifier, idp: IdP,
                                       rsa_key: RSAKey, marker: dict[str, str]) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, **marker), typ="JWT")
    assert refused(verifier, token) == "token_type_invalid"


def test_keycloak_refresh_token_refused(verifier: AccessTokenVerifier, idp: IdP,
                                        rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer, typ="Refresh"), typ="JWT")
    assert refused(verifier, token) == "token_type_invalid"


def test_other_typ_header_refused(verifier: AccessTokenVerifier, idp: IdP,
                                  rsa_key: RSAKey) -> None:
    token = mint(rsa_key, claims_for(idp.issuer), typ="logout+jwt")
    assert refused(verifier, token) == "token_type_invalid"


# -- the identity provider failing ---------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_idp_down(rsa_key: RSAKey, clock: FakeClock) -> None:
    issuer = f"http://127.0.0.1:{_closed_port()}/realms/charter"
    verifier = AccessTokenVerifier(make_settings(issuer), clock=clock)
    with pytest.raises(UnauthenticatedError) as info:
        verifier.verify(mint(rsa_key, claims_for(issuer)))
    assert info.value.code == "jwks_unavailable"
    assert info.value.status == 503


@pytest.mark.parametrize("status,body", [
    (200, b"<html>maintenance</html>"),
    (200, b'{"keys": "none"}'),
    (200, b'{"keys": []}'),
    (200, b'{"keys": [{"kty": "RSA", "kid": "rsa-1", "n": "!!", "e": "AQAB"}]}'),
    (200, b"[1, 2, 3]"),
    (503, b'{"keys": []}'),
])
def test_jwks_answering_garbage(idp: IdP, clock: FakeClock, rsa_key: RSAKey, status: int,
                                body: bytes) -> None:
    idp.serve_raw(body, status)
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    assert refused(verifier, mint(rsa_key, claims_for(idp.issuer))) == "jwks_unavailable"


def test_jwks_redirect_not_followed(idp: IdP, clock: FakeClock, rsa_key: RSAKey) -> None:
    idp.routes["/elsewhere"] = (200, json.dumps({"keys": [rsa_key.as_dict(private=False)]})
                                .encode(), {})
    idp.serve_raw(b"", 302, Location=idp.base + "/elsewhere")
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    assert refused(verifier, mint(rsa_key, claims_for(idp.issuer))) == "jwks_unavailable"
    assert idp.hits["/elsewhere"] == 0


def test_jwks_larger_than_the_bound(idp: IdP, clock: FakeClock, rsa_key: RSAKey) -> None:
    filler = [{"kty": "oct", "kid": f"pad-{i}", "k": "x" * 1000} for i in range(1100)]
    idp.serve_keys(rsa_key, extra=filler)
    assert len(idp.routes[JWKS_PATH][1]) > MAX_DOCUMENT_BYTES
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    assert refused(verifier, mint(rsa_key, claims_for(idp.issuer))) == "jwks_unavailable"


@pytest.mark.parametrize("discovery", [{"issuer": "https://evil.example/realms/charter"},
                                       {"jwks_uri": "file:///etc/passwd"},
                                       {"jwks_uri": None}])
def test_discovery_document_refused(idp: IdP, clock: FakeClock, rsa_key: RSAKey,
                                    discovery: dict[str, Any]) -> None:
    idp.serve_discovery(**discovery)
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    assert refused(verifier, mint(rsa_key, claims_for(idp.issuer))) == "jwks_unavailable"
    assert idp.jwks_hits == 0


def test_failed_fetch_is_rate_limited_then_recovers(idp: IdP, clock: FakeClock,
                                                    rsa_key: RSAKey) -> None:
    idp.serve_raw(b"oops", 500)
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    token = mint(rsa_key, claims_for(idp.issuer))
    assert refused(verifier, token) == "jwks_unavailable"
    assert refused(verifier, token) == "jwks_unavailable"
    assert idp.jwks_hits == 1  # a failing IdP is not hammered either
    idp.serve_keys(rsa_key)
    clock.advance(MIN_REFRESH_S + 1)
    assert verifier.verify(token)["sub"] == "user-42"


def test_unknown_kid_while_idp_down(verifier: AccessTokenVerifier, idp: IdP, rsa_key: RSAKey,
                                    rsa_key_2: RSAKey, clock: FakeClock) -> None:
    assert verifier.verify(mint(rsa_key, claims_for(idp.issuer)))
    idp.serve_raw(b"", 502)
    clock.advance(MIN_REFRESH_S + 1)
    assert refused(verifier, mint(rsa_key_2, claims_for(idp.issuer))) == "jwks_unavailable"


def test_stale_keys_kept_while_idp_down(verifier: AccessTokenVerifier, idp: IdP,
                                        rsa_key: RSAKey, clock: FakeClock) -> None:
    token = mint(rsa_key, claims_for(idp.issuer))
    assert verifier.verify(token)
    idp.serve_raw(b"", 502)
    clock.advance(JWKS_MAX_AGE_S + 1)
    assert verifier.verify(token)["sub"] == "user-42"  # known keys, IdP merely unreachable
    assert idp.jwks_hits == 2


def test_discovery_url_setting_is_used(idp: IdP, clock: FakeClock, rsa_key: RSAKey) -> None:
    idp.routes["/custom/discovery"] = idp.routes.pop(DISCOVERY_PATH)
    settings = make_settings(idp.issuer, oidc_discovery_url=idp.base + "/custom/discovery")
    verifier = AccessTokenVerifier(settings, clock=clock)
    assert verifier.verify(mint(rsa_key, claims_for(idp.issuer)))["sub"] == "user-42"


def test_hmac_secret_never_accepted_even_as_an_oct_jwk(idp: IdP, clock: FakeClock) -> None:
    oct_key = OctKey.generate_key(256, parameters={"kid": "oct-only"})
    idp.serve_raw(json.dumps({"keys": [oct_key.as_dict()]}).encode())
    verifier = AccessTokenVerifier(make_settings(idp.issuer), clock=clock)
    token = craft({"alg": "RS256", "kid": "oct-only", "typ": "at+jwt"},
                  claims_for(idp.issuer), hs256(oct_key.raw_value))
    assert refused(verifier, token) == "jwks_unavailable"  # no usable signing key at all
