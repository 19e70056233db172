"""The emulator's token exchange: workload identity (RFC 8693) as ``https://auth.openai.com/oauth/token`` does
it, so that a connection with ``auth_type: workload_identity`` can be tested end to end on loopback.

``POST {emulator}/oauth/token`` takes the SDK's JSON request and answers ``{"access_token", "expires_in",
"token_type", "issued_token_type"}``. The tokens it issues open every endpoint of the emulator until they
expire, after ``lifetime`` seconds; an expired one gets a 401. Every exchange is recorded.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_openai_batch.testing._http import Response
from airflow_provider_openai_batch.testing._wire import error, json_response

TOKEN_PATH = "/oauth/token"
#: ``GET`` lists the exchanges (without their subject tokens), for tests whose clients run in other processes.
CONTROL_PATH = "/_emulator/token_exchanges"
PATHS = frozenset({TOKEN_PATH, CONTROL_PATH})
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPES = frozenset(
    {"urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token"}
)
_REQUIRED = ("subject_token", "subject_token_type", "identity_provider_id", "service_account_id")


@dataclass(frozen=True)
class RecordedExchange:
    """One request to the token exchange, as received, and the status it was answered with."""

    identity_provider_id: str | None
    service_account_id: str | None
    subject_token_type: str | None
    subject_token: str | None = field(repr=False)
    status: int  #: 0 when the connection was dropped
    at: float  #: ``time.monotonic()`` at arrival


class TokenExchange:
    """Issues access tokens for subject tokens; one per emulator, as ``emulator.token_exchange``.

    :param lifetime: seconds an issued token is valid (its ``expires_in``).
    :param subject_tokens: the subject tokens accepted; ``None`` accepts any non-empty one. Others get a 401
        ``invalid_grant``, as a real exchange refuses an identity it cannot verify.
    """

    def __init__(self, lifetime: float = 3600.0, subject_tokens: set[str] | None = None) -> None:
        self.lifetime = lifetime
        self.subject_tokens = subject_tokens
        self._lock = threading.Lock()
        self._issued: dict[str, float] = {}  # access token -> monotonic expiry
        self._exchanges: list[RecordedExchange] = []
        self._failures: list[int] = []

    @property
    def exchanges(self) -> list[RecordedExchange]:
        with self._lock:
            return list(self._exchanges)

    @property
    def issued(self) -> list[str]:
        """Every access token issued so far, expired ones included."""
        with self._lock:
            return list(self._issued)

    def fail(self, status: int = 503, times: int = 1) -> None:
        """Answer the next ``times`` exchanges with ``status`` (0: drop the connection without an answer)."""
        with self._lock:
            self._failures.extend([status] * times)

    def expire_tokens(self) -> None:
        """Make every token issued so far expired, as a revocation or a clock skew would."""
        with self._lock:
            self._issued = dict.fromkeys(self._issued, float("-inf"))

    def respond(self, method: str, path: str, body: bytes) -> Response | None:
        """Answer one request to :data:`TOKEN_PATH` (``None`` drops the connection) or :data:`CONTROL_PATH`."""
        if path == CONTROL_PATH:
            described = [
                dataclasses.asdict(exchange) | {"subject_token": None} for exchange in self.exchanges
            ]
            return json_response(200, described)
        try:
            request: Any = json.loads(body or b"null")
        except ValueError:
            request = None
        fields = request if isinstance(request, dict) else {}
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            response = (
                None if failure == 0 else error(failure, f"Emulated {failure} from the token exchange.")
            )
        elif method != "POST":
            response = error(405, f"Method {method} not allowed on {TOKEN_PATH}.")
        else:
            response = self._exchange(fields)
        exchange = RecordedExchange(
            identity_provider_id=fields.get("identity_provider_id"),
            service_account_id=fields.get("service_account_id"),
            subject_token_type=fields.get("subject_token_type"),
            subject_token=fields.get("subject_token"),
            status=0 if response is None else response.status,
            at=time.monotonic(),
        )
        with self._lock:
            self._exchanges.append(exchange)
        return response

    def _exchange(self, fields: dict[str, Any]) -> Response:
        if fields.get("grant_type") != GRANT_TYPE:
            return _oauth_error(400, "unsupported_grant_type", f"grant_type must be {GRANT_TYPE!r}.")
        missing = [name for name in _REQUIRED if not isinstance(fields.get(name), str) or not fields[name]]
        if missing:
            return _oauth_error(400, "invalid_request", f"Missing {', '.join(missing)}.")
        if fields["subject_token_type"] not in SUBJECT_TOKEN_TYPES:
            return _oauth_error(400, "invalid_request", "Unsupported subject_token_type.")
        if self.subject_tokens is not None and fields["subject_token"] not in self.subject_tokens:
            return _oauth_error(401, "invalid_grant", "The subject token could not be verified.")
        token = f"oaiwi-{secrets.token_urlsafe(24)}"
        with self._lock:
            self._issued[token] = time.monotonic() + self.lifetime
        return json_response(
            200,
            {
                "access_token": token,
                "expires_in": self.lifetime,
                "token_type": "Bearer",
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            },
        )

    def authenticate(self, headers: dict[str, str], denied: Response) -> Response | None:
        """``None`` for a request carrying an unexpired issued token, a 401 for an expired one, else ``denied``
        (the API key check's answer)."""
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        with self._lock:
            expires_at = self._issued.get(token.strip()) if scheme.lower() == "bearer" else None
        if expires_at is None:
            return denied
        if time.monotonic() < expires_at:
            return None
        return error(401, "The access token has expired.", code="token_expired")


def _oauth_error(status: int, code: str, description: str) -> Response:
    """An RFC 6749 error answer, the shape token endpoints use."""
    return json_response(status, {"error": code, "error_description": description})
