"""Strict validation of OAuth2 JWT access tokens issued by the organisation's OIDC provider.

`AccessTokenVerifier(settings).verify(token)` returns the claims of a valid access token or
raises `UnauthenticatedError` with one of these stable codes (status 401 unless noted):

- `token_too_large`: the token is longer than `max_token_bytes`.
- `token_malformed`: not three base64url segments, header or payload not a JSON object,
  duplicate JSON members, or a header parameter or claim of the wrong type.
- `alg_not_allowed`: `alg` is `none` (any casing), HMAC (`HS*`) or not in the allowlist;
  checked on the header before any key is looked up.
- `header_forbidden`: the header carries `jku`, `jwk`, `x5u`, `x5c`, `crit` or `b64`; keys and
  URLs named by the token itself are never trusted.
- `kid_missing`: the header names no key id.
- `kid_unknown`: no key of that id, even after the rate-limited JWKS refresh.
- `key_type_mismatch`: the key does not fit the algorithm (kty, curve, or the key's own `alg`).
- `signature_invalid`: the signature does not verify.
- `claims_missing`: no `sub`, `exp`, `iss` or `aud`.
- `issuer_invalid`: `iss` differs from the configured issuer (exact string comparison).
- `audience_invalid`: `aud` (string or list) does not contain the configured audience.
- `token_expired`: `exp` has passed, beyond the leeway.
- `token_not_yet_valid`: `nbf`, or `iat`, lies in the future beyond the leeway.
- `token_type_invalid`: the token is not an access token (rule below).
- `jwks_unavailable` (status 503): the discovery document or the JWKS cannot be fetched or is
  unusable; the request is refused (fail closed).

Token type rule (`typ` header compared case-insensitively, an `application/` prefix ignored):
1. a `typ` header other than `at+jwt` or `JWT` is refused;
2. a `typ` claim (Keycloak) must be `Bearer` (case-insensitive); any other value (`ID`,
   `Refresh`, `Logout`...) is refused, and `Bearer` accepts the token;
3. a `typ` header of `at+jwt` (RFC 9068) accepts the token;
4. otherwise (header `JWT` or absent: Entra ID, Okta) the token is refused when it looks like
   an ID token: it has a `nonce`, `at_hash` or `c_hash` claim.
Keycloak before 25 puts `nonce` into access tokens too, which is why its `typ: Bearer` claim
decides before the ID-token markers are looked at. The audience check is the other guard:
ID tokens carry the client id as `aud`, not the API audience.

Messages never quote the token or values taken from it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from joserfc import jws
from joserfc.errors import (
    BadSignatureError,
    InvalidKeyCurveError,
    InvalidKeyTypeError,
    JoseError,
    UnsupportedKeyAlgorithmError,
    UnsupportedKeyUseError,
)
from joserfc.jwk import JWKRegistry, Key
from joserfc.util import urlsafe_b64decode

from charter.errors import ConfigurationError, UnauthenticatedError
from charter.settings import Settings

log = structlog.get_logger("charter.jwt")

MAX_DOCUMENT_BYTES = 1_048_576  # discovery document and JWKS
JWKS_MAX_AGE_S = 900.0  # keys older than this are refetched (picks up revocations)
JWKS_STALE_LIMIT_S = 86_400.0  # past this age, keys the IdP cannot confirm are not used
MIN_RSA_BITS = 2048

# alg -> (kty, required curve or None)
_ALG_KEYS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "ES256K": ("EC", "secp256k1"),
    "EdDSA": ("OKP", None), "Ed25519": ("OKP", "Ed25519"), "Ed448": ("OKP", "Ed448"),
}
_FORBIDDEN_HEADERS = ("jku", "jwk", "x5u", "x5c", "crit", "b64")
_STRING_HEADERS = ("alg", "kid", "typ", "cty", "x5t", "x5t#S256")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_ID_TOKEN_MARKERS = ("nonce", "at_hash", "c_hash")


class _FetchError(Exception):
    """The identity provider did not deliver a usable document; the reason is for the log."""


@dataclass(frozen=True, slots=True)
class _KeyCache:
    keys: Mapping[str, tuple[Key, ...]]
    fetched_at: float  # monotonic


def _refuse(message: str, code: str, **details: Any) -> UnauthenticatedError:
    return UnauthenticatedError(message, code=code, details=details or None)


def _unavailable() -> UnauthenticatedError:
    return UnauthenticatedError(
        "the identity provider's signing keys are unavailable; try again later",
        code="jwks_unavailable", status=503,
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate member")
        result[key] = value
    return result


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object parsed strictly (UTF-8, no duplicate members); None if it is not one."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _segment_object(segment: str) -> dict[str, Any] | None:
    if not segment or not _SEGMENT.fullmatch(segment):
        return None
    try:
        raw = urlsafe_b64decode(segment.encode("ascii"))
    except ValueError:  # binascii.Error is a ValueError
        return None
    return _json_object(raw)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class AccessTokenVerifier:
    """Verifies access tokens against the issuer's published keys; safe to share across threads."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], float] = time.time) -> None:
        if not settings.oidc_issuer or not settings.oidc_audience:
            raise ConfigurationError("JWT access tokens need CHARTER_OIDC_ISSUER and "
                                     "CHARTER_OIDC_AUDIENCE")
        refused = [a for a in settings.algorithms if a not in _ALG_KEYS]
        if refused or not settings.algorithms:
            raise ConfigurationError(
                "CHARTER_OIDC_ALGORITHMS: only asymmetric JWS algorithms are accepted",
                details={"problems": [f"CHARTER_OIDC_ALGORITHMS: refused {refused}"],
                         "supported": sorted(_ALG_KEYS)},
            )
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.discovery_url = (settings.oidc_discovery_url
                              or self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if urlsplit(self.discovery_url).scheme not in ("http", "https"):
            raise ConfigurationError("CHARTER_OIDC_DISCOVERY_URL: must be an http(s) URL")
        self.algorithms = frozenset(settings.algorithms)
        self.leeway_s = settings.oidc_leeway_s
        self.max_token_bytes = settings.max_token_bytes
        self.min_refresh_s = settings.oidc_jwks_min_refresh_s
        self.http_timeout_s = settings.oidc_http_timeout_s
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        self._jwks_uri: str | None = None
        self._cache: _KeyCache | None = None
        self._last_attempt: float | None = None
        # Header types and forbidden parameters are checked here; unknown extra header
        # parameters (Entra ID adds some) are harmless once those checks passed.
        self._registries: dict[str, jws.JWSRegistry] = {}
        for alg in self.algorithms:
            registry = jws.JWSRegistry(algorithms=[alg], strict_check_header=False)
            registry.max_header_length = self.max_token_bytes  # the token's limit governs
            self._registries[alg] = registry

    # -- verification ------------------------------------------------------------------------

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid access token; UnauthenticatedError with a stable code if not."""
        header, claims = self._parse(token)
        alg = header["alg"]
        key = self._key_for(header["kid"], alg)
        try:
            obj = jws.deserialize_compact(token, key, algorithms=[alg],
                                          registry=self._registries[alg])
        except BadSignatureError:
            raise _refuse("the token's signature is invalid", "signature_invalid") from None
        except (InvalidKeyTypeError, InvalidKeyCurveError, UnsupportedKeyAlgorithmError,
                UnsupportedKeyUseError):
            raise _refuse("the signing key does not fit the token's algorithm",
                          "key_type_mismatch") from None
        except JoseError:
            raise _refuse("the token is malformed", "token_malformed") from None
        # The verified payload is the same segment parsed above; parse what was verified.
        verified = _json_object(obj.payload or b"")
        if verified != claims:  # pragma: no cover - same bytes, defensive
            raise _refuse("the token is malformed", "token_malformed")
        self._check_claims(header, claims)
        return claims

    def _parse(self, token: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Structural and header checks: everything decided before a key is looked up."""
        if not isinstance(token, str):
            raise _refuse("the token is malformed", "token_malformed")
        if len(token.encode("utf-8")) > self.max_token_bytes:
            raise _refuse(f"the token is longer than {self.max_token_bytes} bytes",
                          "token_too_large", max_token_bytes=self.max_token_bytes)
        parts = token.split(".")
        if len(parts) != 3 or not _SEGMENT.fullmatch(parts[2]):
            raise _refuse("the token is not a signed JWT (three base64url parts)",
                          "token_malformed")
        header = _segment_object(parts[0])
        if header is None:
            raise _refuse("the token's header is not a JSON object", "token_malformed")
        for name in _STRING_HEADERS:
            if name in header and not isinstance(header[name], str):
                raise _refuse("the token's header has a parameter of the wrong type",
                              "token_malformed")
        alg = header.get("alg")
        if alg is None:
            raise _refuse("the token's header names no algorithm", "token_malformed")
        if alg not in self.algorithms:
            raise _refuse("the token's signing algorithm is not allowed", "alg_not_allowed",
                          allowed=sorted(self.algorithms))
        forbidden = sorted(h for h in _FORBIDDEN_HEADERS if h in header)
        if forbidden:
            raise _refuse("the token's header carries parameters that are refused",
                          "header_forbidden", parameters=forbidden)
        if not header.get("kid"):
            raise _refuse("the token's header names no key id", "kid_missing")
        claims = _segment_object(parts[1])
        if claims is None:
            raise _refuse("the token's payload is not a JSON object", "token_malformed")
        return header, claims

    def _check_claims(self, header: dict[str, Any], claims: dict[str, Any]) -> None:
        missing = [c for c in ("sub", "exp", "iss", "aud") if c not in claims]
        if missing:
            raise _refuse("the token lacks required claims", "claims_missing", claims=missing)
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if (not isinstance(claims["sub"], str) or not isinstance(claims["iss"], str)
                or not isinstance(audiences, list)
                or not all(isinstance(a, str) for a in audiences)
                or any(c in claims and not _is_number(claims[c]) for c in ("exp", "nbf", "iat"))):
            raise _refuse("the token has a claim of the wrong type", "token_malformed")
        if not claims["sub"]:
            raise _refuse("the token lacks required claims", "claims_missing", claims=["sub"])
        if claims["iss"] != self.issuer:
            raise _refuse("the token was issued by another issuer", "issuer_invalid")
        if self.audience not in audiences:
            raise _refuse("the token is not meant for this service", "audience_invalid")
        now = self._now()
        if now >= claims["exp"] + self.leeway_s:
            raise _refuse("the token has expired", "token_expired")
        for claim in ("nbf", "iat"):
            if claim in claims and claims[claim] > now + self.leeway_s:
                raise _refuse("the token is not valid yet", "token_not_yet_valid", claim=claim)
        if not _is_access_token(header, claims):
            raise _refuse("the token is not an access token", "token_type_invalid")

    # -- keys --------------------------------------------------------------------------------

    def _key_for(self, kid: str, alg: str) -> Key:
        cache = self._cache
        if cache is None:
            cache = self._refresh(None, required=True)
        elif self._clock() - cache.fetched_at >= JWKS_MAX_AGE_S:
            cache = self._refresh(cache, required=False)
        candidates = cache.keys.get(kid)
        if candidates is None:
            cache = self._refresh(cache, required=False, unknown_kid=True)
            candidates = cache.keys.get(kid)
        if candidates is None:
            raise _refuse("the token was signed with a key the issuer does not publish",
                          "kid_unknown")
        kty, curve = _ALG_KEYS[alg]
        for key in candidates:
            if (key.key_type == kty and (curve is None or key.get("crv") == curve)
                    and key.get("alg") in (None, alg)):
                return key
        raise _refuse("the signing key does not fit the token's algorithm", "key_type_mismatch")

    def _refresh(self, seen: _KeyCache | None, *, required: bool,
                 unknown_kid: bool = False) -> _KeyCache:
        """Fetch the JWKS, at most once per min_refresh_s; answers the newest cache."""
        with self._lock:
            current = self._cache
            if current is not seen and current is not None:
                return current  # another thread refreshed while this one waited
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self.min_refresh_s:
                if current is None:
                    raise _unavailable()
                return current
            self._last_attempt = now
            try:
                keys = self._fetch_keys()
            except _FetchError as exc:
                self._jwks_uri = None  # rediscover next time: the jwks_uri may have moved
                log.warning("could not fetch the identity provider's keys", reason=str(exc))
                stale_ok = (current is not None and not required and not unknown_kid
                            and now - current.fetched_at < JWKS_STALE_LIMIT_S)
                if stale_ok:
                    return current  # type: ignore[return-value]
                raise _unavailable() from None
            self._cache = _KeyCache(keys, now)
            log.info("fetched the identity provider's keys", kids=sorted(keys),
                     reason="unknown kid" if unknown_kid else "refresh")
            return self._cache

    def _fetch_keys(self) -> dict[str, tuple[Key, ...]]:
        with httpx.Client(timeout=self.http_timeout_s, follow_redirects=False) as client:
            return self._fetch_keys_with(client)

    def _fetch_keys_with(self, client: httpx.Client) -> dict[str, tuple[Key, ...]]:
        if self._jwks_uri is None:
            discovery = _fetch_json(client, self.discovery_url, self.http_timeout_s)
            if discovery.get("issuer") != self.issuer:
                raise _FetchError("the discovery document names another issuer")
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in (
                    "http", "https"):
                raise _FetchError("the discovery document has no http(s) jwks_uri")
            if (urlsplit(self.discovery_url).scheme == "https"
                    and urlsplit(jwks_uri).scheme != "https"):
                raise _FetchError("the jwks_uri downgrades https to http")
            self._jwks_uri = jwks_uri
        jwks = _fetch_json(client, self._jwks_uri, self.http_timeout_s)
        entries = jwks.get("keys")
        if not isinstance(entries, list):
            raise _FetchError("the JWKS has no key list")
        keys: dict[str, list[Key]] = {}
        for entry in entries:
            key = _import_key(entry)
            if key is not None:
                keys.setdefault(entry["kid"], []).append(key)
        if not keys:
            raise _FetchError("the JWKS holds no usable signing key")
        return {kid: tuple(found) for kid, found in keys.items()}



def _fetch_json(client: httpx.Client, url: str, timeout_s: float) -> dict[str, Any]:
    """GET a JSON object: no redirects, at most MAX_DOCUMENT_BYTES, within twice the timeout."""
    deadline = time.monotonic() + 2 * timeout_s  # httpx's timeout is per read, not in total
    try:
        with client.stream("GET", url, headers={"Accept": "application/json"}) as resp:
            if resp.status_code != 200:
                raise _FetchError(f"{url} answered {resp.status_code}")
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise _FetchError(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise _FetchError(f"{url} answered too slowly")
    except httpx.HTTPError as exc:
        raise _FetchError(f"{url}: {type(exc).__name__}") from None
    document = _json_object(bytes(body))
    if document is None:
        raise _FetchError(f"{url} did not answer a JSON object")
    return document


def _import_key(entry: Any) -> Key | None:
    """A public signing key from a JWKS entry; None for keys that are never used."""
    if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or not entry["kid"]:
        return None
    if entry.get("kty") not in ("RSA", "EC", "OKP"):  # `oct` (HMAC) keys are ignored on purpose
        return None
    if entry.get("use", "sig") != "sig":
        return None
    public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
    try:
        key = JWKRegistry.import_key(public)
    except (JoseError, ValueError, TypeError):
        log.warning("ignoring a JWKS key that does not import", kid=entry["kid"][:100])
        return None
    raw = key.raw_value
    if key.key_type == "RSA" and getattr(raw, "key_size", 0) < MIN_RSA_BITS:
        log.warning("ignoring an RSA key shorter than 2048 bits", kid=entry["kid"][:100])
        return None
    return key


def _is_access_token(header: dict[str, Any], claims: dict[str, Any]) -> bool:
    """The token type rule of the module docstring."""
    typ = header.get("typ")
    header_typ = typ.lower().removeprefix("application/") if isinstance(typ, str) else None
    if header_typ not in (None, "jwt", "at+jwt"):
        return False
    if "typ" in claims:
        claim = claims["typ"]
        return isinstance(claim, str) and claim.lower() == "bearer"
    if header_typ == "at+jwt":
        return True
    return not any(marker in claims for marker in _ID_TOKEN_MARKERS)
