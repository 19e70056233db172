"""Registration with Airflow's ProvidersManager, as `airflow providers ...`, the connection form and the
connection test see it: checked through what Airflow does with the provider info, not against a copy of
it."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import distribution, entry_points
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from airflow_provider_openai_batch.hooks._connection_form import EXTRA_FIELDS, FIELD_BEHAVIOUR
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests.conftest import FAKE_API_KEY

#: The distribution that registers the provider's entry point.
[ENTRY_POINT] = [
    entry
    for entry in entry_points(group="apache_airflow_provider")
    if entry.value.startswith("airflow_provider_openai_batch")
]
DISTRIBUTION = ENTRY_POINT.dist.name if ENTRY_POINT.dist else ""


def airflow_cli(*args: str) -> str:
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run(
        [str(airflow), *args], check=False, capture_output=True, text=True, env=os.environ, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def api_server_hook_meta(conn_type: str) -> dict[str, Any]:
    """The connection form's metadata for ``conn_type`` as the API server builds it, in a fresh process as in
    the API server: Airflow 3.0 and 3.1 build it while their WTForms stand-ins are patched in, and their
    ProvidersManager keeps the first widgets it was given, so in a process whose hooks were already imported
    (this one) they would be the real WTForms fields, which the API server cannot convert."""
    script = (
        "import json, sys\n"
        "from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService\n"
        "print(json.dumps([meta.model_dump(mode='json') for meta in HookMetaService.hook_meta_data()"
        " if meta.connection_type == sys.argv[1]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, conn_type],
        check=False,
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [meta] = json.loads(result.stdout.splitlines()[-1])
    return meta


def providers_manager() -> Any:
    from airflow.providers_manager import ProvidersManager

    return ProvidersManager()


def discovered_hooks() -> dict[str, Any]:
    """The hooks by connection type, from the task SDK's providers manager if it has one, else Airflow's."""
    try:
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime as Manager
    except ImportError:  # before Airflow 3.3
        from airflow.providers_manager import ProvidersManager as Manager
    return Manager().hooks


def discovered_connection_type() -> dict[str, Any]:
    """The provider's connection type, as ProvidersManager loaded it from the entry point."""
    provider = providers_manager().providers[DISTRIBUTION]
    [connection_type] = provider.data["connection-types"]
    return connection_type


def test_airflow_discovers_the_installed_distribution_and_its_hook() -> None:
    """The provider info names the distribution that registers it, at its installed version, and its
    connection type resolves to a hook whose own declarations agree (the UI and the connection test use
    both)."""
    from airflow.providers.common.compat.module_loading import import_string

    assert providers_manager().providers[DISTRIBUTION].version == distribution(DISTRIBUTION).version
    [(conn_type, hook_info)] = [
        (conn_type, info)
        for conn_type, info in discovered_hooks().items()
        if info and info.package_name == DISTRIBUTION
    ]
    hook_class = import_string(hook_info.hook_class_name)
    assert issubclass(hook_class, OpenAIBatchHook)
    assert (hook_class.conn_type, hook_class.hook_name) == (conn_type, hook_info.hook_name)
    # Airflow builds the hook as hook_class(**{connection_id_attribute_name: conn_id}).
    assert hook_info.connection_id_attribute_name in inspect.signature(hook_class).parameters
    assert hook_info.connection_testable


@pytest.mark.parametrize(
    ("key", "works"), [(FAKE_API_KEY, True), ("sk-wrong", False)], ids=["right-key", "wrong-key"]
)
def test_airflow_s_connection_test_reaches_the_api_through_the_discovered_hook(
    emulator: BatchAPIEmulator, set_connection: Callable[..., None], key: str, works: bool
) -> None:
    """What the UI's Test button runs: Airflow finds the hook by the connection's type and calls it."""
    from airflow.models.connection import Connection

    set_connection("openai_probe", password=key, host=emulator.base_url)
    ok, message = Connection.get_connection_from_secrets("openai_probe").test_connection()
    assert ok is works, message
    assert [(r.method, r.path) for r in emulator.requests] == [("GET", "/v1/batches")]


def samples(schema: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Values of an extra its schema accepts (first one other than the default, then its bounds), and values
    just past its bounds, which it refuses."""
    if "enum" in schema:
        return [schema["enum"][-1]], [f"not-{schema['enum'][-1]}"]
    if "examples" in schema:
        return schema["examples"][:1], []
    if "exclusiveMinimum" in schema:
        bound = schema["exclusiveMinimum"]
        return [bound + 7, bound + (1 if "integer" in schema["type"] else 0.001)], [bound]
    if "minimum" in schema:
        return [schema["minimum"] + 7, schema["minimum"]], [schema["minimum"] - 1]
    return ["value-7"], []


#: A workload identity connection, less its ``auth_type``.
IDENTITY = {
    "identity_provider_id": "idp_1",
    "service_account_id": "sa_1",
    "workload_identity_provider": "kubernetes",
}


def base_extra(name: str) -> dict[str, Any]:
    """The extras an extra of the form is tried with: a workload identity field in a workload identity
    connection (with a custom source for the custom source's fields), ``auth_type`` in one without it."""
    workload_identity = {**IDENTITY, "auth_type": "workload_identity"}
    if name == "auth_type":
        return IDENTITY
    if name in ("token_provider", "token_type"):
        return {**workload_identity, "workload_identity_provider": "custom", "token_provider": "pkg.get"}
    if name in (*IDENTITY, "token_file_path", "refresh_buffer_seconds", "token_exchange_url"):
        return workload_identity
    return {}


def test_every_form_extra_is_a_json_schema_and_is_read_by_the_hook(
    set_connection: Callable[..., None],
) -> None:
    """Each extra the connection form offers changes what the hook does, and the hook accepts exactly what the
    form's schema accepts, up to its bounds: what the schema refuses, the hook refuses too, before any
    request."""
    for name, field in discovered_connection_type()["conn-fields"].items():
        schema = field["schema"]
        jsonschema.Draft202012Validator.check_schema(schema)
        accepted, refused = samples(schema)
        base = base_extra(name)
        set_connection(password=FAKE_API_KEY, extra=base)
        defaults = OpenAIBatchHook().settings
        for value in accepted:
            jsonschema.validate(value, schema)
            set_connection(password=FAKE_API_KEY, extra={**base, name: value})
            assert OpenAIBatchHook().settings != defaults, f"extra {name}={value!r} changes nothing"
        for value in refused:
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(value, schema)
            set_connection(password=FAKE_API_KEY, extra={**base, name: value})
            with pytest.raises(ValueError, match=name):
                _ = OpenAIBatchHook().settings


def test_airflow_cli_lists_the_provider_and_its_hook() -> None:
    assert "airflow-provider-openai-batch" in airflow_cli("providers", "list", "--output", "plain")
    hooks = airflow_cli("providers", "hooks", "--output", "plain")
    assert "openai_batch" in hooks and "OpenAIBatchHook" in hooks


def test_the_api_server_builds_the_connection_form(set_connection: Callable[..., None]) -> None:
    """The form as the UI receives it, from the API server's own hook metadata: Airflow 3.2 and later build it
    from the provider info, 3.0 and 3.1 from the hook's WTForms fields. Every extra is optional, and the
    default each one states is the one the hook uses without it."""
    meta = api_server_hook_meta(OpenAIBatchHook.conn_type)
    assert meta["hook_name"] == OpenAIBatchHook.hook_name
    standard = meta["standard_fields"]
    for name, label in FIELD_BEHAVIOUR["relabeling"].items():
        assert standard[name]["title"] == label
    assert standard["host"]["placeholder"] == FIELD_BEHAVIOUR["placeholders"]["host"]
    hidden = {"schema": "url_schema"}
    assert all(standard[hidden.get(name, name)]["hidden"] for name in FIELD_BEHAVIOUR["hidden_fields"])
    extras = meta["extra_fields"]
    assert {name: field["schema"]["title"] for name, field in extras.items()} == {
        name: field["label"] for name, field in EXTRA_FIELDS.items()
    }
    assert extras["api_type"]["schema"]["enum"] == EXTRA_FIELDS["api_type"]["schema"]["enum"]
    assert all("null" in field["schema"]["type"] for field in extras.values()), "every extra is optional"

    set_connection(password=FAKE_API_KEY)
    settings = OpenAIBatchHook().settings
    stated = {
        name: match[1]
        for name, field in extras.items()
        if (match := re.search(r"Default: ([^ ]+?)\.?$", field["description"] or ""))
    }
    assert stated.keys() == {"timeout", "max_retries"}
    assert {name: float(value) for name, value in stated.items()} == {
        name: getattr(settings, name) for name in stated
    }
