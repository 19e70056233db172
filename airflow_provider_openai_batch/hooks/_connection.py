"""Turning an Airflow connection into validated HTTP client settings.

Kept apart from the hook so the sync and the async paths read a connection the same way, and so every
mistake in a connection is reported, with the field named, before any request is sent.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 3

#: Extra of the official ``apache-airflow-providers-openai`` connection; read too, so its connections work here.
OFFICIAL_CLIENT_KWARGS = "openai_client_kwargs"


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything needed to talk to the Batch API, read once from a connection.

    Frozen and hashable, so equal settings can share one HTTP client; the key is kept out of ``repr``.
    """

    conn_id: str
    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    organization: str | None = None
    project: str | None = None
    api_type: Literal["openai", "azure"] = "openai"
    api_version: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    #: A CA bundle (file or folder) for a private CA or a TLS-inspecting proxy; read when a client is built.
    ca_bundle: str | None = None

    @classmethod
    def from_connection(cls, conn: Connection, extras: dict[str, Any] | None) -> ConnectionSettings:
        """Validate ``conn`` and its parsed ``extras`` and build settings from them; raise ``ValueError``
        naming the faulty field.

        The extras come separately because reading them is sync or async depending on the caller's path.
        """
        conn_id = conn.conn_id
        extras = extras or {}
        client_kwargs = extras.get(OFFICIAL_CLIENT_KWARGS) or {}
        if not isinstance(client_kwargs, dict):  # a bad connection value, like every other one here
            raise ValueError(  # noqa: TRY004
                f"Connection '{conn_id}': extra '{OFFICIAL_CLIENT_KWARGS}' must be a JSON object."
            )

        def pick(name: str) -> Any:
            for source in (extras, client_kwargs):
                if source.get(name) not in (None, ""):
                    return source[name]
            return None

        api_key = conn.password or client_kwargs.get("api_key")
        if not api_key:
            raise ValueError(
                f"Connection '{conn_id}' has no API key: set its password (or "
                f"'{OFFICIAL_CLIENT_KWARGS}.api_key' in its extras)."
            )
        _check_header_safe_key(conn_id, api_key)
        api_type = (pick("api_type") or "openai").lower()
        if api_type not in ("openai", "azure"):
            raise ValueError(
                f"Connection '{conn_id}': extra 'api_type' must be 'openai' or 'azure', not {api_type!r}."
            )
        return cls(
            conn_id=conn_id,
            api_key=api_key,
            base_url=_validated_base_url(
                conn_id, conn.host or client_kwargs.get("base_url") or DEFAULT_BASE_URL
            ),
            organization=pick("organization"),
            project=pick("project"),
            api_type=cast(Literal["openai", "azure"], api_type),
            api_version=pick("api_version"),
            timeout=_number(
                conn_id, "timeout", pick("timeout"), DEFAULT_TIMEOUT, float, minimum=0, strict=True
            ),
            max_retries=_number(
                conn_id, "max_retries", pick("max_retries"), DEFAULT_MAX_RETRIES, int, minimum=0
            ),
            ca_bundle=pick("ca_bundle"),
        )

    @property
    def headers(self) -> dict[str, str]:
        """Authentication and scoping headers sent with every request."""
        headers = (
            {"api-key": self.api_key}
            if self.api_type == "azure"
            else {"Authorization": f"Bearer {self.api_key}"}
        )
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        if self.project:
            headers["OpenAI-Project"] = self.project
        return headers

    @property
    def params(self) -> dict[str, str]:
        """Query parameters sent with every request (Azure OpenAI's ``api-version``)."""
        return {"api-version": self.api_version} if self.api_version else {}

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by the sync ``httpx.Client`` and the ``httpx.AsyncClient``."""
        return {
            "base_url": self.base_url,
            "headers": self.headers,
            "params": self.params,
            "timeout": httpx.Timeout(self.timeout),
            "verify": shared_ssl_context(self.ca_bundle),
        }


_ssl_contexts: dict[str | None, ssl.SSLContext] = {}


def has_ssl_context(ca_bundle: str | None) -> bool:
    return ca_bundle in _ssl_contexts


def shared_ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """One TLS context per CA bundle per process: building one reads the bundle from disk, so it is done once.

    The CAs trusted are, first found: the connection's ``ca_bundle`` extra; ``SSL_CERT_FILE`` or
    ``SSL_CERT_DIR`` (read by httpx); ``REQUESTS_CA_BUNDLE``, which requests-based tools and many corporate
    machines set; else certifi's bundle.
    """
    if (context := _ssl_contexts.get(ca_bundle)) is not None:
        return context
    bundle = ca_bundle
    if bundle is None and not (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")):
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or None
    try:
        if bundle is None:
            context = httpx.create_ssl_context()
        elif os.path.isdir(bundle):
            context = ssl.create_default_context(capath=bundle)
        else:
            context = ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"Cannot load the CA bundle {bundle!r}: {error}") from error
    return _ssl_contexts.setdefault(ca_bundle, context)


def _validated_base_url(conn_id: str, raw: str) -> str:
    url = httpx.URL(raw.strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"Connection '{conn_id}': base URL {raw!r} must be an absolute http(s) URL, "
            f"e.g. {DEFAULT_BASE_URL!r}."
        )
    if url.scheme == "http" and not _is_loopback(url.host):
        log.warning(
            "Connection '%s' sends the API key in clear text over http:// to %s; use https://.",
            conn_id,
            url.host,
        )
    return str(url)


#: How each kind of character that cannot be in a header is named in an error, which never quotes the key.
_UNSENDABLE = {
    "\n": "a line feed (\\n)",
    "\r": "a carriage return (\\r)",
    "\x00": "a NUL byte",
    " ": "a space",
}


def _check_header_safe_key(conn_id: str, api_key: str) -> None:
    """Refuse a key that cannot be sent in a header, before any request, without quoting it.

    Sent as it is, such a key fails inside the HTTP stack with an error that quotes the header, key included
    (``Illegal header value b'Bearer sk-...\\n'``), which would reach logs, trigger events and XComs. A trailing
    newline is the usual cause: a secret read from a file. Keys are printable ASCII without spaces.
    """
    if not isinstance(api_key, str):  # a bad connection value, like every other one here
        raise ValueError(  # noqa: TRY004
            f"Connection '{conn_id}': the API key must be a string, not {type(api_key).__name__}."
        )
    bad = next((index for index, char in enumerate(api_key) if not "!" <= char <= "~"), None)
    if bad is None:
        return
    char = api_key[bad]
    kind = _UNSENDABLE.get(char) or ("a non-ASCII character" if ord(char) > 0x7E else "a control character")
    where = "at its start" if bad == 0 else "at its end" if bad == len(api_key) - 1 else "inside it"
    raise ValueError(
        f"Connection '{conn_id}': the API key cannot be sent in an HTTP header: it has {kind} {where} "
        "(a key read from a file often ends with a newline). Keys are printable ASCII without spaces; "
        "the key is not shown here."
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(
    conn_id: str,
    name: str,
    raw: Any,
    default: float,
    kind: type[float | int],
    *,
    minimum: float,
    strict: bool = False,
) -> Any:
    """Parse a numeric extra; the UI stores extras as strings, so ``"30"`` is accepted."""
    if raw is None or raw == "":
        return default
    try:
        if isinstance(raw, bool):
            raise TypeError
        value = kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"Connection '{conn_id}': extra '{name}' must be a number, got {raw!r}.") from None
    if value < minimum or (strict and value == minimum):
        bound = "greater than" if strict else "at least"
        raise ValueError(f"Connection '{conn_id}': extra '{name}' must be {bound} {minimum}, got {raw!r}.")
    return value
