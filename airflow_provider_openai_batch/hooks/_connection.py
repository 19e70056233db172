"""Turning an Airflow connection into validated HTTP client settings.

Kept apart from the hook so the sync and the async paths read a connection the same way, and so every
mistake in a connection is reported, with the field named, before any request is sent.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx

from airflow_provider_openai_batch.hooks import _workload_identity
from airflow_provider_openai_batch.hooks._defaults import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
)
from airflow_provider_openai_batch.hooks._workload_identity import AUTH_TYPES, WorkloadIdentity

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection

log = logging.getLogger(__name__)

#: Bounds of the numeric extras: finite, and small enough for every timer and retry loop they feed.
MAX_TIMEOUT = 86_400.0
MAX_RETRIES = 100

#: Extra of the official ``apache-airflow-providers-openai`` connection; read too, so its connections work here.
OFFICIAL_CLIENT_KWARGS = "openai_client_kwargs"
#: Keys of ``openai_client_kwargs`` that the official hook passes to the ``openai`` client and that this provider
#: reads the same way (docs/connections.md has the table). ``api_type``, ``api_version`` and ``ca_bundle`` are
#: this provider's own extras, read there too.
CLIENT_KWARGS_READ = frozenset(
    {
        "api_key",
        "base_url",
        "organization",
        "project",
        "timeout",
        "max_retries",
        "default_headers",
        "default_query",
        "api_type",
        "api_version",
        "ca_bundle",
    }
)
#: Keys accepted and not used: they configure what this provider never calls (webhook signature checks, the
#: Realtime API's websocket), so a connection shared with the official provider keeps working here.
CLIENT_KWARGS_NOT_APPLICABLE = frozenset({"webhook_secret", "websocket_base_url"})
#: Headers that carry a credential: set by the key, never by ``default_headers`` (which is neither masked nor
#: checked as a secret).
_CREDENTIAL_HEADERS = frozenset({"authorization", "api-key"})


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
    #: ``openai_client_kwargs.default_headers`` and ``default_query``, as pairs so that settings stay hashable.
    default_headers: tuple[tuple[str, str], ...] = ()
    default_query: tuple[tuple[str, str], ...] = ()
    #: Set with ``auth_type: workload_identity``: then ``api_key`` is empty and each request carries the
    #: identity's access token (``_tokens``).
    workload_identity: WorkloadIdentity | None = None

    @classmethod
    def from_connection(cls, conn: Connection, extras: dict[str, Any] | None) -> ConnectionSettings:
        """Validate ``conn`` and its parsed ``extras`` and build settings from them; raise ``ValueError``
        naming the faulty field.

        The extras come separately because reading them is sync or async depending on the caller's path.
        """
        conn_id = conn.conn_id
        read = _Reader(conn_id, extras)
        identity = read.auth_type()
        api_key = "" if identity else read.api_key(conn.password)
        api_type = read.text("api_type") or "openai"
        if api_type.lower() not in ("openai", "azure") or (identity and api_type.lower() != "openai"):
            allowed = "'openai' with workload identity" if identity else "'openai' or 'azure'"
            raise ValueError(f"Connection '{conn_id}': extra 'api_type' must be {allowed}, not {api_type!r}.")
        return cls(
            conn_id=conn_id,
            api_key=api_key,
            base_url=read.base_url(conn.host),
            organization=read.header_value("organization"),
            project=read.header_value("project"),
            api_type=cast(Literal["openai", "azure"], api_type.lower()),
            # With workload identity the top-level ``api_version`` is Azure IMDS's, as the official hook reads it.
            api_version=None if identity else read.text("api_version"),
            timeout=read.number(
                "timeout", DEFAULT_TIMEOUT, float, minimum=0, maximum=MAX_TIMEOUT, strict=True
            ),
            max_retries=read.number("max_retries", DEFAULT_MAX_RETRIES, int, minimum=0, maximum=MAX_RETRIES),
            ca_bundle=read.text("ca_bundle"),
            default_headers=read.mapping("default_headers", header=True),
            default_query=read.mapping("default_query", header=False),
            workload_identity=identity,
        )

    @property
    def rate_key(self) -> str:
        """What the API's rate limit is kept per: the key, or the workload identity."""
        identity = self.workload_identity
        if identity is None:
            return self.api_key
        return f"workload-identity {identity.identity_provider_id} {identity.service_account_id}"

    @property
    def headers(self) -> dict[str, str]:
        """Authentication and scoping headers sent with every request."""
        headers = (
            {}  # the access token is added to each request
            if self.workload_identity
            else {"api-key": self.api_key}
            if self.api_type == "azure"
            else {"Authorization": f"Bearer {self.api_key}"}
        )
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        if self.project:
            headers["OpenAI-Project"] = self.project
        # After the others, as the openai client does: a gateway's header of the same name replaces ours.
        merged = httpx.Headers(headers)
        merged.update(dict(self.default_headers))
        return dict(merged.items())

    @property
    def params(self) -> dict[str, str]:
        """Query parameters sent with every request: ``default_query``, and Azure OpenAI's ``api-version``."""
        params = dict(self.default_query)
        if self.api_version:
            params["api-version"] = self.api_version
        return params

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


class _Reader:
    """Reads each setting of one connection from where it can be, checking its type, range and characters.

    Every value is checked where it enters, so that a wrong one fails here, with the connection and the field
    named, rather than later as an error of the HTTP stack (``OverflowError``, ``UnicodeEncodeError``,
    ``httpx.InvalidURL``...) that names neither, or never (a NaN timeout that times every request out).
    """

    def __init__(self, conn_id: str, extras: Any) -> None:
        self.conn_id = conn_id
        extras = {} if extras is None else extras
        if not isinstance(extras, dict):  # a bad connection value, like every other one here
            raise ValueError(  # noqa: TRY004
                f"Connection '{conn_id}': its extra must be a JSON object, not {_json_kind(extras)}."
            )
        client_kwargs = extras.get(OFFICIAL_CLIENT_KWARGS)
        client_kwargs = {} if client_kwargs in (None, "") else client_kwargs
        if not isinstance(client_kwargs, dict):
            raise ValueError(  # noqa: TRY004
                f"Connection '{conn_id}': extra '{OFFICIAL_CLIENT_KWARGS}' must be a JSON object."
            )
        self.extras: dict[str, Any] = extras
        self.client_kwargs: dict[str, Any] = client_kwargs

        for key in client_kwargs:
            if key not in CLIENT_KWARGS_READ | CLIENT_KWARGS_NOT_APPLICABLE:
                supported = ", ".join(sorted(CLIENT_KWARGS_READ | CLIENT_KWARGS_NOT_APPLICABLE))
                raise ValueError(
                    f"Connection '{conn_id}': extra '{OFFICIAL_CLIENT_KWARGS}.{key}' is not supported by this "
                    f"provider (supported: {supported}); see docs/connections.md."
                )

    def raw(self, name: str) -> tuple[str, Any]:
        """The value of setting ``name`` and the field it came from; ``None`` and ``""`` mean unset.

        ``openai_client_kwargs`` first, as the official hook reads only that: a connection shared by both
        providers then means the same to both, whatever its top-level extras say.
        """
        for field_name, source in (
            (f"{OFFICIAL_CLIENT_KWARGS}.{name}", self.client_kwargs),
            (name, self.extras),
        ):
            if source.get(name) not in (None, ""):
                return field_name, source[name]
        return name, None

    def fail(self, field_name: str, problem: str) -> ValueError:
        return ValueError(f"Connection '{self.conn_id}': extra '{field_name}' {problem}")

    def text(self, name: str) -> str | None:
        """A string setting: printable, without control characters."""
        field_name, value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(field_name, f"must be a string, not {_json_kind(value)}.")
        if not value.isprintable():
            raise self.fail(field_name, f"must not contain control characters, got {value!r}.")
        return value

    def header_value(self, name: str) -> str | None:
        """A string sent as a header value: printable ASCII, no surrounding spaces."""
        value = self.text(name)
        if value is not None and (not value.isascii() or value != value.strip()):
            field_name, _ = self.raw(name)
            raise self.fail(
                field_name,
                f"is sent as a header, so it must be ASCII without surrounding spaces, got {value!r}.",
            )
        return value

    def number(
        self,
        name: str,
        default: float,
        kind: type[float | int],
        *,
        minimum: float,
        maximum: float,
        strict: bool = False,
    ) -> Any:
        """A finite number within bounds; the UI stores extras as strings, so ``"30"`` is accepted. An integer
        setting refuses a fraction rather than dropping it (``1.9`` retries is not 1)."""
        field_name, raw = self.raw(name)
        if raw is None:
            return default
        noun = "an integer" if kind is int else "a number"
        try:
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise TypeError
            value = float(raw)
        except (TypeError, ValueError):
            raise self.fail(field_name, f"must be {noun}, got {raw!r}.") from None
        if not math.isfinite(value) or (kind is int and not value.is_integer()):
            raise self.fail(field_name, f"must be {noun}, got {raw!r}.")
        if value < minimum or (strict and value == minimum):
            bound = "greater than" if strict else "at least"
            raise self.fail(field_name, f"must be {bound} {minimum}, got {raw!r}.")
        if value > maximum:
            raise self.fail(field_name, f"must be at most {maximum:g}, got {raw!r}.")
        return kind(value)

    def auth_type(self) -> WorkloadIdentity | None:
        """``auth_type``, as the official provider reads it: ``api_key`` (the default) or ``workload_identity``,
        whose settings are then read."""
        field_name, auth_type = "auth_type", self.extras.get("auth_type")
        if auth_type is None or auth_type == "api_key":
            return None
        if auth_type == "workload_identity":
            identity = _workload_identity.read(self)
            url = httpx.URL(identity.token_exchange_url)
            if url.scheme == "http" and not _is_loopback(url.host):
                log.warning(
                    "Connection '%s' sends its identity token in clear text over http:// to %s; use https://.",
                    self.conn_id,
                    url.host,
                )
            return identity
        raise self.fail(field_name, f"must be one of {', '.join(map(repr, AUTH_TYPES))}, not {auth_type!r}.")

    def mapping(self, name: str, *, header: bool) -> tuple[tuple[str, str], ...]:
        """``openai_client_kwargs.default_headers`` or ``default_query``: an object of strings, header-safe for
        headers; a credential header is refused (the key is set as the password or ``api_key``, masked)."""
        field_name, value = f"{OFFICIAL_CLIENT_KWARGS}.{name}", self.client_kwargs.get(name)
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise self.fail(field_name, f"must be a JSON object, not {_json_kind(value)}.")
        pairs = []
        for key, item in value.items():
            if not isinstance(item, str):
                raise self.fail(field_name, f"must map names to strings; {key!r} is {_json_kind(item)}.")
            if header:
                if not _is_token(key):
                    raise self.fail(field_name, f"has {key!r}, which is not a valid header name.")
                if key.lower() in _CREDENTIAL_HEADERS:
                    raise self.fail(
                        field_name,
                        f"must not set {key!r}: the key goes in the password or '{OFFICIAL_CLIENT_KWARGS}.api_key', "
                        "where it is masked.",
                    )
                if not (item.isascii() and item.isprintable()):
                    raise self.fail(field_name, f"has a value for {key!r} that cannot be sent in a header.")
            elif not (key.isprintable() and item.isprintable()):
                raise self.fail(field_name, f"has {key!r} with control characters.")
            pairs.append((key, item))
        return tuple(pairs)

    def api_key(self, password: Any) -> str:
        """The key: ``openai_client_kwargs.api_key``, else the password, as the official hook reads it;
        header-safe (see :func:`_check_header_safe_key`)."""
        api_key = self.client_kwargs.get("api_key") or password
        if isinstance(api_key, str) and not api_key.strip():
            api_key = None
        if not api_key:
            raise ValueError(
                f"Connection '{self.conn_id}' has no API key: set its password (or "
                f"'{OFFICIAL_CLIENT_KWARGS}.api_key' in its extras)."
            )
        _check_header_safe_key(self.conn_id, api_key)
        return api_key

    def base_url(self, host: Any) -> str:
        """The API root: ``openai_client_kwargs.base_url``, else the host, else OpenAI's, as the official hook. An absolute http(s)
        URL with a valid port and neither credentials, a query nor a fragment."""
        field_name, raw = (
            (f"extra '{OFFICIAL_CLIENT_KWARGS}.base_url'", self.client_kwargs["base_url"])
            if self.client_kwargs.get("base_url")
            else ("host", host)
        )
        if not raw:
            return DEFAULT_BASE_URL
        where = f"Connection '{self.conn_id}': base URL"
        if not isinstance(raw, str):
            raise ValueError(f"{where} ({field_name}) must be a string, not {_json_kind(raw)}.")  # noqa: TRY004
        try:
            url = httpx.URL(raw.strip())
            port = url.port
        except httpx.InvalidURL as error:
            raise ValueError(f"{where} {raw!r} ({field_name}) is not a valid URL: {error}.") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{where} {raw!r} must be an absolute http(s) URL, e.g. {DEFAULT_BASE_URL!r}.")
        # Not quoted from here on: a user name, a password or a query may be a credential.
        shown = f"{url.scheme}://{url.host}{url.path}"
        if url.userinfo:
            # httpx would send them as Basic auth on the sync path only (issue 24, defect 14), and the key
            # already authenticates: refused rather than sent one way here and another way there.
            raise ValueError(
                f"{where} ({field_name}) must not hold a user name or password ('user:password@'); the key is "
                f"the connection's password. Use {shown!r}."
            )
        if url.query or url.fragment:
            raise ValueError(
                f"{where} ({field_name}) must not have a query or a fragment (every request path is appended "
                f"to it); use {shown!r}, and the 'api_version' extra for Azure's api-version."
            )
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"{where} {shown!r} ({field_name}): port {port} is not between 1 and 65535.")
        if url.scheme == "http" and not _is_loopback(url.host):
            log.warning(
                "Connection '%s' sends the API key in clear text over http:// to %s; use https://.",
                self.conn_id,
                url.host,
            )
        return str(url)


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_token(name: str) -> bool:
    """Whether ``name`` is a valid header name (an RFC 9110 token)."""
    return bool(name) and all(char in _TOKEN_CHARS for char in name)


def _json_kind(value: Any) -> str:
    """What a wrong value is, in the words of the JSON it was read from."""
    kinds = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return kinds.get(type(value), type(value).__name__)
