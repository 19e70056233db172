"""The "OpenAI Batch" connection form as a person sees it: Airflow's own UI, in headless Chromium.

The API server of the session's deployment serves the UI; SimpleAuthManager with all users admins logs the
browser in by itself. What the form shows comes from ``hooks/_connection_form.py`` through the API server's
hook metadata; what it stores is checked through the REST API and the provider's own reading of the
connection.

Airflow 3.3.2's UI writes every extra field of the form into the stored extra, ``null`` where left empty (see
docs/connections.md, "Connections made in the UI"); the provider reads ``null`` as unset, which is what
:func:`test_saving_stores_what_was_entered_and_masks_the_key` holds it to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import playwright.sync_api as playwright  # the `test` extra installs it; only its driver, not its browsers
import pytest

from airflow_provider_openai_batch.hooks._connection import ConnectionSettings
from airflow_provider_openai_batch.hooks._connection_form import EXTRA_FIELDS
from tests.system.deployment import Deployment

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

#: Debian's package; the browser builds Playwright downloads are not used.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
#: Milliseconds any one wait on the page may take: a cold API server on 2 CPUs renders its first page slowly.
UI_TIMEOUT_MS = 60_000
HOOK_NAME = "OpenAI Batch"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium package (`apt-get install chromium`, as .ci/run does)"
        )
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, deployment: Deployment, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context on the deployment's Connections page."""
    context = browser.new_context(viewport={"width": 1400, "height": 1200})
    context.set_default_timeout(UI_TIMEOUT_MS)
    playwright.expect.set_options(timeout=UI_TIMEOUT_MS)
    page = context.new_page()
    try:
        with _evidence_on_failure(page, deployment.home / "screenshots" / f"{request.node.name}.png"):
            page.goto(f"{deployment.api_url}/connections")
            yield page
    finally:
        context.close()


@contextmanager
def _evidence_on_failure(page: Any, screenshot: Path) -> Iterator[None]:
    """On an exception in the test, save a screenshot and the page's HTML and name both in the traceback."""
    try:
        yield
    except BaseException as error:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        try:
            page.screenshot(path=str(screenshot), full_page=True)
            screenshot.with_suffix(".html").write_text(page.content())
            error.add_note(f"Browser evidence: {screenshot} and {screenshot.with_suffix('.html')}")
        except Exception as evidence_error:  # noqa: BLE001 - never hide the test's failure behind this one
            error.add_note(f"No browser evidence: {evidence_error!r}")
        raise


# ------------------------------------------------------------------------------------------- helpers


def open_add_form(page: Any) -> Any:
    """Admin › Connections › Add, with the "OpenAI Batch" type chosen; returns the dialog."""
    page.get_by_role("button", name="Add Connection").click()
    dialog = page.get_by_role("dialog")
    connection_type = dialog.get_by_role("combobox")
    connection_type.fill(HOOK_NAME)
    page.get_by_role("option", name=HOOK_NAME, exact=True).click()
    playwright.expect(dialog.get_by_role("button", name="Standard Fields")).to_be_visible()
    return dialog


def open_section(dialog: Any, name: str) -> None:
    """Expand one of the form's accordion sections (opening one closes the others)."""
    trigger = dialog.get_by_role("button", name=name, exact=True)
    if trigger.get_attribute("aria-expanded") != "true":
        trigger.click()
    playwright.expect(trigger).to_have_attribute("aria-expanded", "true")


def extra_input(dialog: Any, name: str) -> Any:
    """The input of one extra field, by the name the UI gives it. Not by its label: for text fields and the
    dropdown the label's ``for`` misses the input (the UI overrides the input's id with
    ``element_<name>``)."""
    return dialog.locator(f"input[name=element_{name}]")


def extra_field(dialog: Any, name: str) -> Any:
    """The row (a ``group``: label, input, help text) of one extra field."""
    return dialog.get_by_role("group").filter(has=dialog.page.locator(f"input[name=element_{name}]"))


def connection_row(page: Any, conn_id: str) -> Any:
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=conn_id, exact=True))


def click_row_action(page: Any, conn_id: str, action: str) -> None:
    """Click a row's icon button; the pointer leaves first, as a tooltip left open would take the click."""
    page.mouse.move(0, 0)
    connection_row(page, conn_id).get_by_role("button", name=action).click()


def stored_connection(deployment: Deployment, conn_id: str) -> dict[str, Any]:
    response = deployment.http.get(f"/api/v2/connections/{conn_id}")
    response.raise_for_status()
    connection: dict[str, Any] = response.json()
    return connection


def settings_of(conn_id: str, password: str, host: str, extra: dict[str, Any]) -> ConnectionSettings:
    """What the provider makes of a connection: the same code the hook runs on the one Airflow returns."""
    from airflow.sdk import Connection

    conn = Connection(conn_id=conn_id, conn_type="openai_batch", password=password, host=host)
    return ConnectionSettings.from_connection(conn, extra)


def test_the_form_shows_labels_help_and_choices(page: Any) -> None:
    dialog = open_add_form(page)

    # The standard fields: the key and the base URL, relabelled; login, port and schema hidden.
    for label in ("API Key", "Base URL"):
        playwright.expect(dialog.get_by_label(label, exact=True)).to_be_visible()
    playwright.expect(dialog.get_by_label("API Key", exact=True)).to_have_attribute("type", "password")
    playwright.expect(dialog.get_by_label("Base URL", exact=True)).to_have_attribute(
        "placeholder", "https://api.openai.com/v1"
    )
    for hidden in ("Login", "Port", "Schema", "Password", "Host"):
        playwright.expect(dialog.get_by_label(hidden, exact=True)).to_have_count(0)

    # Every extra field, with its label and help text, in the order of the definition.
    open_section(dialog, "Extra Fields")
    for name, field in EXTRA_FIELDS.items():
        row = extra_field(dialog, name)
        playwright.expect(row.locator("label")).to_have_text(field["label"])
        playwright.expect(row).to_contain_text(field["description"])
    # The defaults a person needs, spelled out (and not only in the docs).
    playwright.expect(extra_field(dialog, "timeout")).to_contain_text("Default: 60.")
    playwright.expect(extra_field(dialog, "max_retries")).to_contain_text("Default: 3.")
    section = dialog.get_by_role("region").filter(has=dialog.page.locator("input[name^=element_]"))
    labels = section.locator("label")
    playwright.expect(labels).to_have_text([field["label"] for field in EXTRA_FIELDS.values()])

    # API type: nothing chosen (empty means 'openai'), and only the two real choices: no "null".
    api_type = extra_field(dialog, "api_type").get_by_role("combobox")
    playwright.expect(extra_field(dialog, "api_type")).to_contain_text("Select Value")
    api_type.click()
    options = page.get_by_role("option")
    playwright.expect(options).to_have_text(["openai", "azure"])
    page.keyboard.press("Escape")
    playwright.expect(options).to_have_count(0)


def test_saving_stores_what_was_entered_and_masks_the_key(page: Any, deployment: Deployment) -> None:
    conn_id, key, base_url = "openai_from_the_form", "sk-form-SECRET-7f3a", "https://example.invalid/v1"
    dialog = open_add_form(page)
    dialog.locator("input[name=connection_id]").fill(conn_id)
    dialog.get_by_label("API Key", exact=True).fill(key)
    dialog.get_by_label("Base URL", exact=True).fill(base_url)
    open_section(dialog, "Extra Fields")
    extra_input(dialog, "organization").fill("org-form")
    extra_input(dialog, "max_retries").fill("5")
    dialog.get_by_role("button", name="Save").click()
    playwright.expect(dialog).to_be_hidden()
    playwright.expect(connection_row(page, conn_id)).to_be_visible()

    stored = stored_connection(deployment, conn_id)
    assert (stored["conn_type"], stored["host"], stored["password"]) == ("openai_batch", base_url, "***")
    extra = json.loads(stored["extra"])
    entered = {"organization": "org-form", "max_retries": 5}
    assert {name: value for name, value in extra.items() if value is not None} == entered
    # Airflow 3.3.2's UI writes every other field of the form too, as null (its useParamStore serialises each
    # field's value; docs/connections.md). Nothing but the form's own fields, and the provider reads null as
    # unset: the settings are those of an extra holding only what was entered.
    assert set(extra) <= set(EXTRA_FIELDS), extra
    assert settings_of(conn_id, key, base_url, extra) == settings_of(conn_id, key, base_url, entered)
    assert key not in stored["extra"]

    # Opened again for editing: the key reads *** (and is kept as is unless changed), the entries are back.
    click_row_action(page, conn_id, "Edit Connection")
    dialog = page.get_by_role("dialog")
    playwright.expect(dialog.get_by_label("API Key", exact=True)).to_have_value("***")
    playwright.expect(dialog.get_by_label("Base URL", exact=True)).to_have_value(base_url)
    open_section(dialog, "Extra Fields")
    playwright.expect(extra_input(dialog, "organization")).to_have_value("org-form")
    playwright.expect(extra_input(dialog, "max_retries")).to_have_value("5")
    assert key not in page.content()


def test_the_test_button(page: Any, deployment: Deployment) -> None:
    """The row's Test button against the emulator, without a port and with the documented port 0."""
    conn_id = "openai_test_button"
    body = {
        "connection_id": conn_id,
        "conn_type": "openai_batch",
        "host": deployment.emulator.base_url,
        "password": deployment.api_key,
        "extra": json.dumps({"organization": "org-test-button"}),
    }
    deployment.http.post("/api/v2/connections", json=body).raise_for_status()
    page.reload()
    toasts = page.locator("[data-scope=toast][data-part=root]")

    # Airflow 3.3.2: the button posts port 0 for a connection stored without one, and the API server refuses
    # "a different endpoint" before the provider is called. When this starts failing, update
    # docs/connections.md: Airflow has fixed it.
    click_row_action(page, conn_id, "Test Connection")
    playwright.expect(toasts.filter(has_text="Test Connection Failed")).to_contain_text("Bad Request")

    # The workaround the docs give: store port 0 (the provider ignores the port).
    port_only = {"connection_id": conn_id, "conn_type": "openai_batch", "port": 0}  # as docs/connections.md
    deployment.http.patch(
        f"/api/v2/connections/{conn_id}", params={"update_mask": "port"}, json=port_only
    ).raise_for_status()
    page.reload()
    before = len(deployment.emulator.requests)
    click_row_action(page, conn_id, "Test Connection")
    playwright.expect(toasts.filter(has_text="Test Connection Successful")).to_contain_text(
        "Connection successfully tested"
    )
    [request] = [r for r in deployment.emulator.requests[before:] if r.path == "/v1/batches"]
    assert request.headers["authorization"] == f"Bearer {deployment.api_key}"
    assert request.headers["openai-organization"] == "org-test-button"
