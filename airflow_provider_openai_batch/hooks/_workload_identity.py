"""Workload identity settings: key-less access to the API, read from a connection as the official provider reads
them (``OpenAIHook._build_workload_identity`` in ``apache-airflow-providers-openai`` 2.2.0).

With ``auth_type: workload_identity`` no API key exists: a short-lived identity token of the platform (a
Kubernetes service account token, an Azure managed identity token, a GCP identity token, or one a callable of
yours returns) is exchanged for a short-lived API access token (RFC 8693), as the ``openai`` SDK does it in
``openai/auth/_workload.py``. This module only reads and checks the settings; ``_tokens`` does the exchange.
It imports only the standard library: the connection form, which every Airflow process reads at start-up, quotes
its defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from airflow_provider_openai_batch.hooks._connection import _Reader

#: ``auth_type`` values of the official provider.
AUTH_TYPES = ("api_key", "workload_identity")
DEFAULT_TOKEN_EXCHANGE_URL = "https://auth.openai.com/oauth/token"
DEFAULT_REFRESH_BUFFER_SECONDS = 1200.0
KUBERNETES_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
#: Where the SDK asks for the subject token on Azure (IMDS) and on GCP (the metadata server); the
#: ``metadata_url`` extra replaces them (a test's fake, a sidecar).
AZURE_IMDS_URL = "http://169.254.169.254/metadata/identity/oauth2/token"
GCP_METADATA_URL = (
    "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/identity"
)
#: The SDK's defaults for the query of each metadata request, and the extras that override them.
AZURE_DEFAULTS = {"api-version": "2018-02-01", "resource": "https://management.azure.com/"}
AZURE_EXTRAS = {"resource": "resource", "object_id": "object_id", "client_id": "client_id",
                "msi_res_id": "msi_res_id", "api_version": "api-version"}  # fmt: skip
GCP_DEFAULT_AUDIENCE = "https://api.openai.com/v1"
SOURCES = ("kubernetes", "azure", "gcp", "custom")
#: The SDK's ``token_type`` values of a custom source, and the RFC 8693 subject token type each stands for.
SUBJECT_TOKEN_TYPES = {
    "jwt": "urn:ietf:params:oauth:token-type:jwt",
    "id": "urn:ietf:params:oauth:token-type:id_token",
}


@dataclass(frozen=True)
class WorkloadIdentity:
    """One identity: who to become, where the subject token comes from, and where to exchange it.

    Frozen and hashable: the process keeps one access token per identity (``_tokens``). It holds no secret.
    """

    identity_provider_id: str
    service_account_id: str
    #: ``kubernetes``, ``azure``, ``gcp`` or ``custom`` (``workload_identity_provider``).
    source: str
    refresh_buffer_seconds: float = DEFAULT_REFRESH_BUFFER_SECONDS
    token_exchange_url: str = DEFAULT_TOKEN_EXCHANGE_URL
    token_file_path: str = KUBERNETES_TOKEN_FILE
    #: ``module.attribute`` of a callable returning the subject token (custom source); imported off the loop.
    token_provider: str | None = None
    token_type: str = "jwt"
    #: The metadata server's URL (azure and gcp sources) and the query sent to it, as pairs.
    metadata_url: str | None = None
    metadata_params: tuple[tuple[str, str], ...] = ()

    @property
    def subject_token_type(self) -> str:
        return SUBJECT_TOKEN_TYPES["id" if self.source == "gcp" else self.token_type]

    @property
    def name(self) -> str:
        """The identity as messages name it (ids only)."""
        return (
            f"service account '{self.service_account_id}' of identity provider '{self.identity_provider_id}'"
        )


def read(reader: _Reader) -> WorkloadIdentity:
    """The workload identity of a connection whose ``auth_type`` is ``workload_identity``; ``ValueError`` naming
    the extra that is missing or wrong.

    Top-level extras only, as the official hook reads them.
    """
    extras = reader.extras

    def required(name: str) -> str:
        value = reader.text(name)
        if not value or not value.strip():
            raise reader.fail(name, "is required with 'auth_type': 'workload_identity'.")
        return value.strip()

    identity_provider_id, service_account_id = (
        required("identity_provider_id"),
        required("service_account_id"),
    )
    source = extras.get("workload_identity_provider")
    if source not in SOURCES:
        raise reader.fail(
            "workload_identity_provider",
            f"must be one of {', '.join(map(repr, SOURCES))} with 'auth_type': 'workload_identity', "
            f"not {source!r}.",
        )
    buffer = reader.number(
        "refresh_buffer_seconds", DEFAULT_REFRESH_BUFFER_SECONDS, float, minimum=0, maximum=math.inf
    )
    settings: dict[str, Any] = {
        "identity_provider_id": identity_provider_id,
        "service_account_id": service_account_id,
        "source": source,
        "refresh_buffer_seconds": buffer,
        "token_exchange_url": _url(reader, "token_exchange_url") or DEFAULT_TOKEN_EXCHANGE_URL,
    }
    if source == "kubernetes":
        settings["token_file_path"] = reader.text("token_file_path") or KUBERNETES_TOKEN_FILE
    elif source == "custom":
        settings["token_provider"] = required("token_provider")
        if "." not in settings["token_provider"]:
            raise reader.fail(
                "token_provider", "must be the dotted path of a callable, e.g. 'my_pkg.tokens.get'."
            )
        settings["token_type"] = token_type = reader.text("token_type") or "jwt"
        if token_type not in SUBJECT_TOKEN_TYPES:
            raise reader.fail("token_type", f"must be 'jwt' or 'id', not {token_type!r}.")
    elif source == "azure":
        params = dict(AZURE_DEFAULTS)
        for extra, param in AZURE_EXTRAS.items():
            # Top-level only: ``openai_client_kwargs.api_version`` is Azure OpenAI's, not IMDS's.
            if (value := reader.extras.get(extra)) not in (None, ""):
                if not isinstance(value, str) or not value.isprintable():
                    raise reader.fail(extra, f"must be a string without control characters, got {value!r}.")
                params[param] = value
        settings["metadata_url"] = _url(reader, "metadata_url") or AZURE_IMDS_URL
        settings["metadata_params"] = tuple(params.items())
    else:
        settings["metadata_url"] = _url(reader, "metadata_url") or GCP_METADATA_URL
        settings["metadata_params"] = (("audience", reader.text("audience") or GCP_DEFAULT_AUDIENCE),)
    return WorkloadIdentity(**settings)


def _url(reader: _Reader, name: str) -> str | None:
    """An absolute http(s) URL extra, or ``None`` when unset."""
    value = reader.text(name)
    if value is None:
        return None
    try:
        url = urlsplit(value.strip())
        url.port  # noqa: B018 - parsed when read: an invalid port raises here
    except ValueError as error:
        raise reader.fail(name, f"is not a valid URL: {error}.") from None
    if url.scheme not in ("http", "https") or not url.hostname or "@" in url.netloc or not value.isascii():
        raise reader.fail(name, f"must be an absolute http(s) URL without credentials, got {value!r}.")
    return url.geturl()
