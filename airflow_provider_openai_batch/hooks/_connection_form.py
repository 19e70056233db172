"""The connection form of the "OpenAI Batch" connection type: one definition, in each shape Airflow reads.

Airflow 3.2 and later read the form from the provider info (``ui-field-behaviour`` and ``conn-fields``, see
:mod:`airflow_provider_openai_batch.get_provider_info`) and no longer call the hook. Airflow 3.0 and 3.1 only
call the hook's ``get_ui_field_behaviour()`` and ``get_connection_form_widgets()``, and their API server turns the
WTForms fields into the same JSON schema (it substitutes its own stand-ins for the WTForms classes). Both shapes
are built here from :data:`FIELD_BEHAVIOUR` and :data:`EXTRA_FIELDS`.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_openai_batch.hooks._defaults import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
)
from airflow_provider_openai_batch.hooks._workload_identity import (
    AUTH_TYPES,
    DEFAULT_TOKEN_EXCHANGE_URL,
    KUBERNETES_TOKEN_FILE,
    SOURCES,
    SUBJECT_TOKEN_TYPES,
)

#: The standard fields: the key is the password, the base URL the host; the others mean nothing here.
FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": ["schema", "port", "login"],
    "relabeling": {"password": "API Key", "host": "Base URL"},
    "placeholders": {"host": DEFAULT_BASE_URL},
}

#: The connection's extras, in the provider info's ``conn-fields`` format (a label and a JSON schema each).
EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "organization": {
        "label": "Organization",
        "schema": {"type": ["string", "null"]},
        "description": "Sent as the OpenAI-Organization header.",
    },
    "project": {
        "label": "Project",
        "schema": {"type": ["string", "null"]},
        "description": "Sent as the OpenAI-Project header.",
    },
    "api_type": {
        "label": "API type",
        "schema": {"type": ["string", "null"], "enum": ["openai", "azure"]},
        "description": "'azure' sends the key as an api-key header (Azure OpenAI). Empty means 'openai'.",
    },
    "api_version": {
        "label": "API version",
        "schema": {"type": ["string", "null"]},
        "description": "Azure OpenAI api-version query parameter.",
    },
    "timeout": {
        "label": "Timeout (seconds)",
        "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "description": f"Seconds to wait for each HTTP request. Default: {DEFAULT_TIMEOUT:g}.",
    },
    "max_retries": {
        "label": "Max retries",
        "schema": {"type": ["integer", "null"], "minimum": 0},
        "description": f"Retries of a request that failed transiently (429, 5xx, network). Default: {DEFAULT_MAX_RETRIES}.",
    },
    "auth_type": {
        "label": "Auth type",
        "schema": {"type": ["string", "null"], "enum": list(AUTH_TYPES)},
        "description": "'workload_identity' exchanges the platform's identity token for API access: no API key. "
        "Empty means 'api_key'.",
    },
    "workload_identity_provider": {
        "label": "Workload identity: token source",
        # The source needing no other field last: the form test tries the last value alone.
        "schema": {"type": ["string", "null"], "enum": sorted(SOURCES, key=lambda source: source == "gcp")},
        "description": "Where the identity token comes from. Azure and GCP options: docs/connections.md.",
    },
    "identity_provider_id": {
        "label": "Workload identity: identity provider id",
        "schema": {"type": ["string", "null"]},
        "description": "The identity provider set up in your OpenAI organization.",
    },
    "service_account_id": {
        "label": "Workload identity: service account id",
        "schema": {"type": ["string", "null"]},
        "description": "The OpenAI service account the identity acts as.",
    },
    "token_file_path": {
        "label": "Workload identity: token file (kubernetes)",
        "schema": {"type": ["string", "null"]},
        "description": f"Empty means {KUBERNETES_TOKEN_FILE}.",
    },
    "token_provider": {
        "label": "Workload identity: token provider (custom)",
        "schema": {"type": ["string", "null"], "examples": ["my_package.tokens.get_token"]},
        "description": "Dotted path of a callable returning the identity token.",
    },
    "token_type": {
        "label": "Workload identity: token type (custom)",
        "schema": {"type": ["string", "null"], "enum": list(SUBJECT_TOKEN_TYPES)},
        "description": "'jwt' or 'id' (an OpenID Connect ID token). Empty means 'jwt'.",
    },
    "refresh_buffer_seconds": {
        "label": "Workload identity: refresh buffer (seconds)",
        "schema": {"type": ["number", "null"], "minimum": 0},
        "description": "Refresh the access token this long before it expires (at most half its lifetime). "
        "Empty means 1200.",
    },
    "token_exchange_url": {
        "label": "Workload identity: token exchange URL",
        "schema": {"type": ["string", "null"], "examples": ["https://auth.example.com/oauth/token"]},
        "description": f"Empty means {DEFAULT_TOKEN_EXCHANGE_URL}.",
    },
}


def provider_info_behaviour() -> dict[str, Any]:
    """:data:`FIELD_BEHAVIOUR` with the kebab-case keys of the provider info."""
    return {key.replace("_", "-"): value for key, value in FIELD_BEHAVIOUR.items()}


def wtforms_widgets() -> dict[str, Any]:
    """:data:`EXTRA_FIELDS` as the WTForms fields Airflow 3.0 and 3.1 expect from ``get_connection_form_widgets``.

    Imported when called, not before: those versions' API server patches the WTForms classes with stand-ins
    while it calls this, and skips the form (logging why) where WTForms is not installed.
    """
    from wtforms import IntegerField, StringField  # type: ignore[import-untyped]
    from wtforms.validators import Optional, any_of  # type: ignore[import-untyped]

    widgets: dict[str, Any] = {}
    for name, field in EXTRA_FIELDS.items():
        schema = field["schema"]
        validators: list[Any] = [Optional()]
        if "enum" in schema:
            validators.append(any_of(schema["enum"]))
        if schema["type"][0] == "integer":
            widgets[name] = IntegerField(
                field["label"], validators=validators, description=field["description"]
            )
        else:  # WTForms' FloatField is not one Airflow accepts; the hook parses a number from the string.
            widgets[name] = StringField(
                field["label"], validators=validators, description=field["description"]
            )
    return widgets
