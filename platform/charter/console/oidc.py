"""The console's OIDC relying party: authlib's Flask client, registered from discovery.

Authorization code flow with PKCE (S256), `state` and `nonce`. The pre-login values live
in a short-lived signed `__Host-` cookie, so they are bound to the browser that started
the login and need no server-side row.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from authlib.common.urls import add_params_to_uri
from authlib.integrations.base_client import OAuthError
from authlib.integrations.flask_client import FlaskOAuth2App, OAuth
from flask import Flask
from itsdangerous import BadSignature, URLSafeTimedSerializer
from joserfc.errors import JoseError

from charter.settings import Settings

LOGIN_COOKIE = "__Host-charter_login"
LOGIN_MAX_AGE_S = 600
_SALT = "charter.console.login"


class LoginFailed(Exception):
    """A refused SSO callback; `reason` is the audited code, never a secret."""

    def __init__(self, reason: str, status: int, message: str, *, counts: bool = True,
                 subject: str | None = None, idp_error: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message
        self.counts = counts  # towards the failed-login limit (not the IdP's outages)
        self.subject = subject
        self.idp_error = idp_error


@dataclass(frozen=True, slots=True)
class LoginState:
    state: str
    nonce: str
    code_verifier: str


class LoginStateCodec:
    """Signs and checks the pre-login cookie (HMAC with the secret key, 10 minutes)."""

    def __init__(self, secret_key: str) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt=_SALT)

    def dumps(self, value: LoginState) -> str:
        return self._serializer.dumps([value.state, value.nonce, value.code_verifier])

    def loads(self, raw: str | None) -> LoginState:
        if not raw:
            raise LoginFailed("state_missing", 400, "no login is in progress in this browser")
        try:
            state, nonce, verifier = self._serializer.loads(raw, max_age=LOGIN_MAX_AGE_S)
        except (BadSignature, ValueError, TypeError):
            raise LoginFailed(
                "state_invalid", 400, "the login has expired or was tampered with"
            ) from None
        return LoginState(str(state), str(nonce), str(verifier))


def discovery_url(settings: Settings) -> str:
    return settings.oidc_discovery_url or (
        settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
    )


def origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


class OidcClient:
    """One registered authlib client per app; metadata and JWKS are fetched once, lazily."""

    def __init__(self, app: Flask, settings: Settings) -> None:
        self.settings = settings
        self.redirect_uri = settings.public_url.rstrip("/") + "/console/callback"
        self.post_logout_uri = settings.public_url.rstrip("/") + "/console/login"
        client_kwargs: dict[str, Any] = {
            "scope": settings.oidc_scopes,
            "code_challenge_method": "S256",
            "default_timeout": settings.oidc_http_timeout_s,
        }
        if not settings.oidc_client_secret:
            client_kwargs["token_endpoint_auth_method"] = "none"  # noqa: S105 - public client
        oauth = OAuth(app)
        self.app: FlaskOAuth2App = oauth.register(
            "charter", client_id=settings.oidc_client_id,
            client_secret=settings.oidc_client_secret or None,
            server_metadata_url=discovery_url(settings), client_kwargs=client_kwargs,
        )

    def metadata(self) -> dict[str, Any]:
        try:
            metadata: dict[str, Any] = self.app.load_server_metadata()
        except (requests.RequestException, ValueError) as exc:
            raise LoginFailed("idp_unavailable", 502,
                              "the identity provider cannot be reached; try again later",
                              counts=False) from exc
        # Only the algorithms Charter accepts, whatever the provider advertises.
        advertised = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        metadata["id_token_signing_alg_values_supported"] = [
            a for a in advertised if a in self.settings.algorithms
        ]
        return metadata

    def known_metadata(self) -> dict[str, Any]:
        """Metadata if already fetched; never triggers a request."""
        return self.app.server_metadata if "_loaded_at" in self.app.server_metadata else {}

    def begin(self) -> tuple[str, LoginState]:
        """The authorization URL and the values the callback must see again."""
        self.metadata()
        try:
            rv = self.app.create_authorization_url(self.redirect_uri)
        except (requests.RequestException, RuntimeError) as exc:
            raise LoginFailed("idp_unavailable", 502, "the identity provider is misconfigured "
                              "or unreachable", counts=False) from exc
        return rv["url"], LoginState(rv["state"], rv["nonce"], rv["code_verifier"])

    def finish(self, args: dict[str, str], expected: LoginState) -> tuple[dict[str, Any], str]:
        """Check state, exchange the code with the PKCE verifier, validate the ID token.

        Returns the verified claims and the raw ID token.
        """
        if not hmac.compare_digest(args.get("state", "").encode(), expected.state.encode()):
            raise LoginFailed("state_mismatch", 400,
                              "the login response does not belong to this browser's login")
        if args.get("error"):
            raise LoginFailed("idp_error", 400, "the identity provider refused the login",
                              idp_error=_safe_code(args["error"]))
        code = args.get("code")
        if not code:
            raise LoginFailed("code_missing", 400, "the login response carries no code")
        self.metadata()
        try:
            token = self.app.fetch_access_token(
                redirect_uri=self.redirect_uri, code=code,
                code_verifier=expected.code_verifier,
            )
        except OAuthError as exc:
            raise LoginFailed("code_rejected", 400,
                              "the identity provider did not accept the login response",
                              idp_error=_safe_code(exc.error)) from exc
        except (requests.RequestException, ValueError) as exc:
            raise LoginFailed("idp_unavailable", 502,
                              "the identity provider cannot be reached; try again later",
                              counts=False) from exc
        id_token = token.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise LoginFailed("id_token_missing", 401, "the identity provider sent no ID token")
        try:
            claims = self.app.parse_id_token(
                token, nonce=expected.nonce, leeway=self.settings.oidc_leeway_s,
                claims_options={
                    "iss": {"essential": True, "values": [self.settings.oidc_issuer]},
                    "sub": {"essential": True},
                    "exp": {"essential": True},
                    "iat": {"essential": True},
                },
            )
        except (JoseError, ValueError, KeyError) as exc:
            raise LoginFailed("id_token_invalid", 401,
                              "the ID token did not pass validation") from exc
        except requests.RequestException as exc:
            raise LoginFailed("idp_unavailable", 502, "the identity provider's keys cannot "
                              "be fetched; try again later", counts=False) from exc
        return dict(claims), id_token

    def logout_url(self, id_token_hint: str | None) -> str | None:
        """The provider's end-session URL, or None when it has none (or cannot be asked)."""
        try:
            endpoint = self.metadata().get("end_session_endpoint")
        except LoginFailed:
            return None
        if not isinstance(endpoint, str) or not endpoint:
            return None
        params = {"post_logout_redirect_uri": self.post_logout_uri,
                  "client_id": self.settings.oidc_client_id}
        if id_token_hint:
            params["id_token_hint"] = id_token_hint
        return str(add_params_to_uri(endpoint, params))


def _safe_code(value: object) -> str:
    """An OAuth error code as the audit log may keep it (the codes are a fixed ASCII set)."""
    text = str(value or "")[:64]
    return "".join(c for c in text if c.isalnum() or c in "_-.") or "unknown"
