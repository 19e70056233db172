"""Tests of the Batch API emulator, over real HTTP on loopback, as the provider and users drive it."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from airflow_provider_openai_batch.testing import (
    DEFAULT_API_KEY,
    BatchAPIEmulator,
    EmulatorControl,
    Fault,
    RecordedRequest,
    seed_demo,
)
from airflow_provider_openai_batch.testing.emulator import THREAD_NAME

pytest_plugins = ["airflow_provider_openai_batch.testing.pytest_plugin"]

BATCH_FIELDS = [
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "usage",
    "metadata",
]  # fmt: skip


def emulator_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


def port_is_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def envelope(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test must leave no emulator thread behind (checked after the emulator fixture stopped)."""
    yield
    assert emulator_threads() == []


@pytest.fixture
def emulator(openai_batch_emulator: BatchAPIEmulator) -> BatchAPIEmulator:
    return openai_batch_emulator


@pytest.fixture
def client(emulator: BatchAPIEmulator) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    with httpx.Client(base_url=emulator.base_url, headers=headers, timeout=5) as http:
        yield http


# --- The batch object -------------------------------------------------------------------------------------


def test_seeded_batch_has_every_field_like_the_real_api(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    before = int(time.time())
    seeded = emulator.add_batch(metadata={"team": "search"})

    assert list(seeded) == BATCH_FIELDS
    assert re.fullmatch(r"batch_[0-9a-f]{24}", seeded["id"])
    assert seeded["object"] == "batch"
    assert seeded["status"] == "in_progress"
    assert seeded["endpoint"] == "/v1/chat/completions"
    assert seeded["completion_window"] == "24h"
    assert seeded["input_file_id"] == "file-in-1"
    assert before <= seeded["created_at"] <= int(time.time())
    assert seeded["in_progress_at"] == seeded["created_at"]
    assert seeded["expires_at"] == seeded["created_at"] + 86400
    assert seeded["request_counts"] == {"total": 100, "completed": 0, "failed": 0}
    assert seeded["metadata"] == {"team": "search"}
    unset = {"errors", "output_file_id", "error_file_id", "finalizing_at", "completed_at", "failed_at"}
    unset |= {"expired_at", "cancelling_at", "cancelled_at", "usage"}
    assert all(seeded[name] is None for name in unset)

    response = client.get(f"/batches/{seeded['id']}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == seeded


def test_seeded_batch_is_a_copy_and_fields_override(emulator: BatchAPIEmulator) -> None:
    seeded = emulator.add_batch(
        "batch_x", model="gpt-4.1", usage={"total_tokens": 3}, created_at=1_700_000_000
    )
    seeded["status"] = "mutated"
    seeded["request_counts"]["total"] = -1

    stored = emulator.batch("batch_x")
    assert stored["status"] == "in_progress"
    assert stored["request_counts"]["total"] == 100
    assert stored["model"] == "gpt-4.1"
    assert stored["usage"] == {"total_tokens": 3}
    assert stored["created_at"] == 1_700_000_000
    assert stored["expires_at"] == 1_700_086_400


def test_completed_batch_timestamps_and_results_are_consistent(emulator: BatchAPIEmulator) -> None:
    batch = emulator.add_batch("batch_done", status="completed", created_at=1_700_000_000)

    assert batch["in_progress_at"] == batch["finalizing_at"] == batch["completed_at"] == 1_700_000_000
    assert batch["output_file_id"] == "file-out-done"
    assert batch["error_file_id"] == "file-err-done"
    assert batch["request_counts"] == {"total": 100, "completed": 95, "failed": 5}
    assert batch["cancelling_at"] is None and batch["failed_at"] is None


def test_set_status_forces_a_state_with_its_timestamp(emulator: BatchAPIEmulator) -> None:
    emulator.add_batch("batch_v", status="validating")
    assert emulator.batch("batch_v")["in_progress_at"] is None

    failed = emulator.set_status("batch_v", "failed", metadata={"why": "test"})

    assert failed["status"] == "failed"
    assert isinstance(failed["failed_at"], int)
    assert failed["errors"]["object"] == "list"
    assert failed["errors"]["data"][0].keys() == {"code", "message", "param", "line"}
    assert failed["metadata"] == {"why": "test"}


def test_invalid_seeds_are_rejected(emulator: BatchAPIEmulator) -> None:
    emulator.add_batch("batch_dup")
    with pytest.raises(ValueError, match="already exists"):
        emulator.add_batch("batch_dup")
    with pytest.raises(ValueError, match="Unknown batch status"):
        emulator.add_batch(status="running")
    with pytest.raises(ValueError, match="finish_as"):
        emulator.add_batch(finish_as="in_progress")
    with pytest.raises(ValueError, match="Unknown batch status"):
        emulator.set_status("batch_dup", "done")
    with pytest.raises(KeyError):
        emulator.batch("batch_missing")
    assert len(emulator.add_batches(3, status="validating")) == 3


# --- Creating a batch ---------------------------------------------------------------------------------------

CREATE = {"input_file_id": "file-abc123", "endpoint": "/v1/chat/completions", "completion_window": "24h"}


def requests_jsonl(count: int, url: str = "/v1/chat/completions", start: int = 1) -> bytes:
    """A batch input file of ``count`` requests, as a user writes one."""
    return b"".join(
        json.dumps(
            {
                "custom_id": f"q-{n}",
                "method": "POST",
                "url": url,
                "body": {"model": "gpt-4o-mini", "messages": []},
            }
        ).encode()
        + b"\n"
        for n in range(start, start + count)
    )


@pytest.fixture
def input_file(emulator: BatchAPIEmulator) -> dict:
    """``CREATE``'s input file, of three chat requests."""
    return emulator.add_file(requests_jsonl(3), CREATE["input_file_id"])


def test_create_answers_a_validating_batch_that_lists_and_cancels(
    emulator: BatchAPIEmulator, client: httpx.Client, input_file: dict
) -> None:
    response = client.post("/batches", json={**CREATE, "metadata": {"airflow_run_id": "manual__1"}})
    assert response.status_code == 200
    created = response.json()
    assert list(created) == BATCH_FIELDS
    assert (created["status"], created["input_file_id"]) == ("validating", "file-abc123")
    assert created["metadata"] == {"airflow_run_id": "manual__1"}
    assert emulator.batch(created["id"]) == created
    listed = client.get("/batches").json()["data"][0]
    assert listed["id"] == created["id"], "newest first"
    assert listed["status"] == "in_progress", (
        "a list page is a look at the batch: it moves a created batch on"
    )
    assert client.post(f"/batches/{created['id']}/cancel").json()["status"] == "cancelling"
    first = emulator.requests[0]
    assert (first.method, first.path, first.status) == ("POST", "/v1/batches", 200)
    assert first.batch_status == "validating"


def test_create_without_metadata_has_null_metadata(client: httpx.Client, input_file: dict) -> None:
    assert client.post("/batches", json=CREATE).json()["metadata"] is None


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"input_file_id": None}, "input_file_id", "Missing required parameter: 'input_file_id'."),
        ({"endpoint": "/v1/files"}, "endpoint", "Invalid value: '/v1/files'. Supported values are: "),
        ({"completion_window": "48h"}, "completion_window", "Invalid value: '48h'. Supported values are"),
        ({"metadata": ["a"]}, "metadata", "Invalid type for 'metadata': expected an object, but got list."),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16 keys; got 17"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "keys are 1 to 64 characters"),
        ({"metadata": {"k": "v" * 513}}, "metadata", "values are at most 512 characters"),
        ({"metadata": {"k": 1}}, "metadata", "values are strings"),
    ],
    ids=["no-file", "bad-endpoint", "bad-window", "not-a-dict", "17-keys", "long-key", "long-value", "int"],
)
def test_create_refuses_what_the_api_refuses(
    emulator: BatchAPIEmulator, client: httpx.Client, change: dict, param: str, message: str
) -> None:
    response = client.post("/batches", json={**CREATE, **change})
    assert response.status_code == 400
    assert envelope(response)["param"] == param and message in envelope(response)["message"]
    assert client.get("/batches").json()["data"] == [], "nothing was created"


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]"])
def test_create_refuses_a_body_that_is_not_a_json_object(client: httpx.Client, body: bytes) -> None:
    response = client.post("/batches", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert envelope(response)["message"].startswith("We could not parse the JSON body of your request")


def test_create_needs_the_key(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    response = httpx.post(f"{emulator.base_url}/batches", json=CREATE)
    assert response.status_code == 401
    assert client.get("/batches").json()["data"] == []


# --- Cancellation lifecycle --------------------------------------------------------------------------------


@pytest.mark.parametrize(("cancel_after_polls", "final_on_get"), [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_cancel_becomes_final_on_the_nth_get(
    emulator: BatchAPIEmulator, client: httpx.Client, cancel_after_polls: int, final_on_get: int
) -> None:
    batch = emulator.add_batch("batch_abc", cancel_after_polls=cancel_after_polls)

    cancelled = client.post("/batches/batch_abc/cancel")
    assert cancelled.status_code == 200
    cancelling = cancelled.json()
    assert cancelling["status"] == "cancelling"
    assert isinstance(cancelling["cancelling_at"], int)
    assert cancelling["output_file_id"] is None and cancelling["cancelled_at"] is None

    statuses = [client.get("/batches/batch_abc").json()["status"] for _ in range(final_on_get + 1)]
    assert statuses == ["cancelling"] * (final_on_get - 1) + ["cancelled", "cancelled"]
    final = emulator.batch(batch["id"])
    assert final["cancelled_at"] >= final["cancelling_at"]
    assert final["output_file_id"] == "file-out-abc"
    assert final["error_file_id"] == "file-err-abc"
    assert final["request_counts"] == {"total": 100, "completed": 33, "failed": 1}


def test_a_list_page_is_a_look_at_the_batches_it_shows(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    """A client learns a status from a GET or from a list page: either moves the batch on, a page that does not
    show it does not."""
    emulator.add_batch("batch_l", cancel_after_polls=2, created_at=int(time.time()) - 10)
    emulator.add_batch("batch_newer")
    client.post("/batches/batch_l/cancel")
    for _ in range(3):
        assert [b["id"] for b in client.get("/batches", params={"limit": 1}).json()["data"]] == [
            "batch_newer"
        ]
    assert emulator.batch("batch_l")["status"] == "cancelling"

    assert [client.get("/batches").json()["data"][1]["status"] for _ in range(2)] == [
        "cancelling",
        "cancelled",
    ]


def test_look_count_counts_gets_and_the_list_pages_that_show_the_batch(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.add_batch("batch_old", created_at=int(time.time()) - 10)
    emulator.add_batch("batch_new")
    client.get("/batches/batch_old")
    client.get("/batches", params={"limit": 1})  # shows batch_new only
    client.get("/batches")
    client.post("/batches/batch_old/cancel")  # a cancel is not a look

    assert emulator.look_count("batch_old") == 2
    assert emulator.look_count("batch_new") == 2
    assert emulator.look_count("batch_unknown") == 0


def test_cancel_can_complete_after_a_delay_instead_of_polls(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.add_batch("batch_t", cancel_after_polls=10**9, cancel_after_seconds=0.2)
    client.post("/batches/batch_t/cancel")
    assert client.get("/batches/batch_t").json()["status"] == "cancelling"

    time.sleep(0.25)

    assert client.get("/batches/batch_t").json()["status"] == "cancelled"


def test_server_defaults_apply_and_a_batch_can_be_held_in_cancelling() -> None:
    with (
        BatchAPIEmulator(cancel_after_polls=10**9) as emulator,
        httpx.Client(base_url=emulator.base_url, headers={"api-key": emulator.api_key}) as client,
    ):
        emulator.add_batch("batch_h")
        client.post("/batches/batch_h/cancel")
        assert {client.get("/batches/batch_h").json()["status"] for _ in range(20)} == {"cancelling"}


@pytest.mark.parametrize("finish_as", ["completed", "failed", "expired"])
def test_a_cancelled_batch_can_finish_otherwise(
    emulator: BatchAPIEmulator, client: httpx.Client, finish_as: str
) -> None:
    emulator.add_batch("batch_race", cancel_after_polls=1, finish_as=finish_as)
    client.post("/batches/batch_race/cancel")

    final = client.get("/batches/batch_race").json()

    assert final["status"] == finish_as
    assert isinstance(final[f"{finish_as}_at"], int)
    assert final["cancelled_at"] is None
    if finish_as == "completed":
        assert final["finalizing_at"] is not None
        assert final["request_counts"] == {"total": 100, "completed": 95, "failed": 5}
    if finish_as == "failed":
        assert final["errors"]["data"][0]["code"]
    if finish_as == "expired":
        assert final["output_file_id"] == "file-out-race"
        assert final["request_counts"]["completed"] == 33


def test_cancel_is_idempotent_while_cancelling(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    emulator.add_batch("batch_i", cancel_after_polls=2)
    first = client.post("/batches/batch_i/cancel").json()
    assert client.get("/batches/batch_i").json()["status"] == "cancelling"

    again = client.post("/batches/batch_i/cancel", json={"any": "body"})

    assert again.status_code == 200
    assert again.json()["cancelling_at"] == first["cancelling_at"]
    assert (
        client.get("/batches/batch_i").json()["status"] == "cancelled"
    )  # the repeat did not reset the count
    assert emulator.cancel_count("batch_i") == 2


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing"])
def test_active_batches_can_be_cancelled(
    emulator: BatchAPIEmulator, client: httpx.Client, status: str
) -> None:
    emulator.add_batch("batch_a", status=status)
    response = client.post("/batches/batch_a/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelling"


@pytest.mark.parametrize("status", ["completed", "failed", "expired", "cancelled"])
def test_cancelling_a_finished_batch_is_a_409(
    emulator: BatchAPIEmulator, client: httpx.Client, status: str
) -> None:
    emulator.add_batch("batch_f", status=status)

    response = client.post("/batches/batch_f/cancel")

    assert response.status_code == 409
    assert envelope(response) == {
        "message": f"Cannot cancel a batch with status '{status}'.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert emulator.batch("batch_f")["status"] == status


# --- Finishing without a cancel ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finish_after_polls", "finish_as"),
    [(1, "completed"), (2, "completed"), (3, "failed"), (2, "expired"), (4, "cancelled")],
)
def test_batch_finishes_by_itself_on_its_kth_get(
    emulator: BatchAPIEmulator, client: httpx.Client, finish_after_polls: int, finish_as: str
) -> None:
    emulator.add_batch("batch_k", finish_after_polls=finish_after_polls, finish_as=finish_as)

    answers = [client.get("/batches/batch_k").json() for _ in range(finish_after_polls + 1)]

    statuses = [answer["status"] for answer in answers]
    assert statuses == ["in_progress"] * (finish_after_polls - 1) + [finish_as, finish_as]
    final = answers[-1]
    assert answers[-2] == final == emulator.batch("batch_k")
    assert isinstance(final[f"{finish_as}_at"], int)
    twin = emulator.set_status(emulator.add_batch("batch_twin")["id"], finish_as)  # as set_status makes it
    unset = {name for name, value in final.items() if value is None}
    assert unset == {name for name, value in twin.items() if value is None}
    assert (final["request_counts"], final["errors"]) == (twin["request_counts"], twin["errors"])


def test_finishing_batch_completes_by_default_and_every_look_counts(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.add_batch("batch_d", status="validating", finish_after_polls=3)
    assert client.get("/batches").json()["data"][0]["status"] == "validating"

    statuses = [client.get("/batches/batch_d").json()["status"] for _ in range(2)]

    assert statuses == ["validating", "completed"]
    final = emulator.batch("batch_d")
    assert final["in_progress_at"] == final["finalizing_at"] == final["completed_at"]
    assert final["output_file_id"] == "file-out-d"


def test_an_earlier_end_wins_over_finish_after_polls(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.add_batch("batch_c", finish_after_polls=5, cancel_after_polls=1)
    emulator.add_batch("batch_h", finish_after_polls=2, cancel_after_polls=10**9)
    emulator.add_batch("batch_f", finish_after_polls=2)
    emulator.add_batch("batch_s", finish_after_polls=2)
    emulator.set_status("batch_f", "failed")

    client.post("/batches/batch_c/cancel")
    assert client.get("/batches/batch_c").json()["status"] == "completed"  # as its finish_as, at once
    assert client.get("/batches/batch_h").json()["status"] == "in_progress"
    client.post("/batches/batch_h/cancel")
    assert client.get("/batches/batch_h").json()["status"] == "completed"  # the cancel was still pending
    assert [client.get("/batches/batch_f").json()["status"] for _ in range(3)] == ["failed"] * 3
    assert [client.get("/batches/batch_s").json()["status"] for _ in range(2)] == ["in_progress", "completed"]
    emulator.set_status("batch_s", "in_progress")
    assert client.get("/batches/batch_s").json()["status"] == "in_progress"  # it finishes once only


def test_finish_after_polls_is_exact_under_concurrent_gets(emulator: BatchAPIEmulator) -> None:
    emulator.add_batch("batch_p", finish_after_polls=10)
    statuses: list[str] = []

    def poll() -> None:
        with httpx.Client(base_url=emulator.base_url, headers={"api-key": emulator.api_key}) as http:
            statuses.extend(http.get("/batches/batch_p").json()["status"] for _ in range(5))

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(statuses) == ["completed"] * 31 + ["in_progress"] * 9


def test_invalid_finish_after_polls_is_rejected(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    with pytest.raises(ValueError, match=r"finish_after_polls must be at least 1 .* not 0"):
        emulator.add_batch(finish_after_polls=0)
    with pytest.raises(ValueError, match="finish_after_polls needs a running batch, but status 'completed'"):
        emulator.add_batch(status="completed", finish_after_polls=1)
    with pytest.raises(ValueError, match=r"finish_as must be one of .* not 'in_progress'"):
        emulator.add_batch(finish_after_polls=1, finish_as="in_progress")
    assert client.get("/batches").json()["data"] == [], "nothing was seeded"


# --- Errors and routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "shown_id"),
    [("GET", "/batches/batch_nope", "batch_nope"), ("POST", "/batches/batch_nope/cancel", "batch_nope"),
     ("GET", "/batches/batch%2F1", "batch/1"), ("GET", "/batches/batch%20x", "batch x")],
)  # fmt: skip
def test_unknown_batch_is_a_404(client: httpx.Client, method: str, path: str, shown_id: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 404
    assert envelope(response) == {
        "message": f"No batch found with id '{shown_id}'.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("method", "url"),
    [("DELETE", "/files"), ("PATCH", "/batches"), ("DELETE", "/batches/batch_x"), ("PUT", "/batches/x/cancel"),
     ("GET", "/batches/x/cancel"), ("GET", "/batches/"), ("GET", "http://127.0.0.1:{port}/elsewhere")],
)  # fmt: skip
def test_other_routes_are_404s(
    emulator: BatchAPIEmulator, client: httpx.Client, method: str, url: str
) -> None:
    emulator.add_batch("batch_x")
    response = client.request(method, url.format(port=emulator.port))
    assert response.status_code == 404
    assert envelope(response)["message"].startswith(f"Invalid URL ({method} /")


def test_missing_key_is_a_401(emulator: BatchAPIEmulator) -> None:
    response = httpx.get(f"{emulator.base_url}/batches")
    assert response.status_code == 401
    error = envelope(response)
    assert error["message"].startswith("You didn't provide an API key.")
    assert error["type"] == "invalid_request_error"
    assert error["code"] is None


@pytest.mark.parametrize(
    ("headers", "shown"),
    [({"Authorization": "Bearer sk-wrong-key-0123456789abcd"}, "sk-" + "*" * 20 + "abcd"),
     ({"api-key": "sk-wrong-key-0123456789abcd"}, "sk-" + "*" * 20 + "abcd"),
     ({"Authorization": "Bearer short-key"}, "***"), ({"Authorization": f"Basic {DEFAULT_API_KEY}"}, "Bas")],
)  # fmt: skip
def test_wrong_key_is_a_401_that_never_echoes_the_key(
    emulator: BatchAPIEmulator, headers: dict[str, str], shown: str
) -> None:
    response = httpx.get(f"{emulator.base_url}/batches", headers=headers)

    assert response.status_code == 401
    error = envelope(response)
    assert error["message"].startswith(f"Incorrect API key provided: {shown}")
    assert error["message"].endswith(
        ". You can find your API key at https://platform.openai.com/account/api-keys."
    )
    assert error["code"] == "invalid_api_key"
    offered = next(iter(headers.values())).split()[-1]
    assert offered not in response.text


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {DEFAULT_API_KEY}"}, {"authorization": f"bearer {DEFAULT_API_KEY}"},
     {"api-key": DEFAULT_API_KEY}, {"api-key": DEFAULT_API_KEY, "Authorization": "Bearer ignored"}],
)  # fmt: skip
def test_openai_and_azure_authentication_are_accepted(
    emulator: BatchAPIEmulator, headers: dict[str, str]
) -> None:
    response = httpx.get(
        f"{emulator.base_url}/batches", params={"api-version": "2024-10-21"}, headers=headers
    )
    assert response.status_code == 200


def test_custom_api_key() -> None:
    with BatchAPIEmulator(api_key="sk-custom-0123456789") as emulator:
        url = f"{emulator.base_url}/batches"
        assert httpx.get(url, headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer sk-custom-0123456789"}).status_code == 200


# --- Listing ------------------------------------------------------------------------------------------------


def test_list_pages_newest_first_with_insertion_order_breaking_ties(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    base = 1_700_000_000
    created = [base + (index * 7) % 15 for index in range(45)]  # shuffled, three batches per second
    ids = [emulator.add_batch(created_at=at)["id"] for at in created]
    expected = [ids[i] for i in sorted(range(45), key=lambda i: (created[i], i), reverse=True)]

    seen: list[str] = []
    pages = []
    after: str | None = None
    while True:
        params = {"limit": 20} | ({"after": after} if after else {})
        page = client.get("/batches", params=params).json()
        pages.append(page)
        seen += [batch["id"] for batch in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]

    assert seen == expected
    assert [len(page["data"]) for page in pages] == [20, 20, 5]
    assert [page["has_more"] for page in pages] == [True, True, False]
    assert all(page["object"] == "list" for page in pages)
    assert [(page["first_id"], page["last_id"]) for page in pages] == [
        (expected[0], expected[19]),
        (expected[20], expected[39]),
        (expected[40], expected[44]),
    ]
    assert len(client.get("/batches").json()["data"]) == 20  # the default limit
    assert [b["id"] for b in client.get("/batches", params={"limit": 100}).json()["data"]] == expected


@pytest.mark.parametrize("after", ["batch_unknown", "LAST"])
def test_list_after_an_unknown_or_last_cursor_is_empty(
    emulator: BatchAPIEmulator, client: httpx.Client, after: str
) -> None:
    ids = [batch["id"] for batch in emulator.add_batches(3)]
    page = client.get("/batches", params={"after": ids[0] if after == "LAST" else after}).json()
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_list_of_nothing(client: httpx.Client) -> None:
    page = client.get("/batches").json()
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", ""])
def test_list_limit_out_of_range_is_a_400(client: httpx.Client, limit: str) -> None:
    response = client.get("/batches", params={"limit": limit})
    assert response.status_code == 400
    error = envelope(response)
    assert error["param"] == "limit"
    assert error["type"] == "invalid_request_error"


def test_list_reflects_later_changes(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    emulator.add_batch("batch_old", created_at=1_700_000_000)
    assert [b["id"] for b in client.get("/batches").json()["data"]] == ["batch_old"]
    emulator.add_batch("batch_new")
    emulator.set_status("batch_old", "in_progress", created_at=2_000_000_000)
    assert [b["id"] for b in client.get("/batches").json()["data"]] == ["batch_old", "batch_new"]


# --- Faults -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"), [(500, "server_error"), (503, "server_error"), (400, "invalid_request_error")]
)
def test_status_fault_answers_an_openai_error_envelope(
    emulator: BatchAPIEmulator, client: httpx.Client, status: int, kind: str
) -> None:
    emulator.inject(Fault("status", status=status))

    response = client.get("/batches")

    assert response.status_code == status
    assert envelope(response)["type"] == kind
    assert client.get("/batches").status_code == 200  # spent after one request
    assert [request.status for request in emulator.requests] == [status, 200]


def test_rate_limit_fault_carries_retry_headers(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    emulator.inject(Fault.rate_limited(times=2, retry_after=1))
    emulator.inject(Fault("status", status=429, headers={"retry-after-ms": "50"}))

    responses = [client.get("/batches") for _ in range(4)]

    assert [response.status_code for response in responses] == [429, 429, 429, 200]
    assert responses[0].headers["retry-after"] == "1"
    assert responses[1].headers["retry-after"] == "1"
    assert responses[2].headers["retry-after-ms"] == "50"
    assert envelope(responses[0])["code"] == "rate_limit_exceeded"
    assert envelope(responses[0])["type"] == "requests"


def test_faults_match_by_method_and_path_and_the_first_injected_wins(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.add_batch("batch_m", cancel_after_polls=10**9)
    emulator.inject(Fault("status", status=500, method="post", path=r"/cancel$"))
    emulator.inject(Fault("status", status=502, times=2))
    emulator.inject(Fault("status", status=503, method="POST"))

    assert client.get("/batches/batch_m").status_code == 502
    assert client.post("/batches/batch_m/cancel").status_code == 500
    assert client.post("/batches/batch_m/cancel").status_code == 502
    assert client.post("/batches/batch_m/cancel").status_code == 503
    assert client.post("/batches/batch_m/cancel").status_code == 200
    assert client.get("/batches/batch_m").status_code == 200
    assert emulator.cancel_count("batch_m") == 4  # every cancel received counts, faulted or not


def test_status_fault_with_a_custom_body(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    body = {"error": {"message": "Custom.", "type": "x", "param": None, "code": "custom"}}
    emulator.inject(Fault("status", status=400, body=json.dumps(body)))
    response = client.get("/batches")
    assert response.status_code == 400
    assert response.json() == body


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [(200, b"not json", "application/json"), (502, "<html><h1>502 Bad Gateway</h1></html>", "text/html"),
     (200, b'{"id": "batch_x", "object": "batch"}', "application/json"), (200, None, "application/json")],
)  # fmt: skip
def test_body_fault_sends_the_raw_body(
    emulator: BatchAPIEmulator, client: httpx.Client, status: int, body: bytes | str | None, content_type: str
) -> None:
    emulator.inject(Fault("body", status=status, body=body, content_type=content_type))

    response = client.get("/batches")

    assert response.status_code == status
    assert response.headers["content-type"] == content_type
    assert response.content == (body.encode() if isinstance(body, str) else body or b"")
    assert client.get("/batches").json()["object"] == "list"  # the connection is still usable


def test_drop_fault_loses_the_connection_mid_response(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.inject(Fault("drop", path="/batches$"))

    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get("/batches")

    assert client.get("/batches").status_code == 200  # the client reconnects
    assert [request.status for request in emulator.requests] == [0, 200]


def test_delay_fault_makes_a_client_time_out(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    emulator.inject(Fault("delay", delay=1.0))

    with pytest.raises(httpx.ReadTimeout):
        client.get("/batches", timeout=0.2)

    assert client.get("/batches", timeout=2).status_code == 200


def test_delay_fault_answers_normally_after_the_delay(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.add_batch("batch_d")
    emulator.inject(Fault("delay", delay=0.2, headers={"x-delayed": "yes"}))

    started = time.monotonic()
    response = client.get("/batches/batch_d")

    assert time.monotonic() - started >= 0.2
    assert response.status_code == 200
    assert response.json()["id"] == "batch_d"
    assert response.headers["x-delayed"] == "yes"


def test_faults_are_validated_and_can_be_cleared(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    with pytest.raises(ValueError, match="kind"):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="times"):
        Fault("status", times=0)
    fault = Fault("status", times=5)
    emulator.inject(fault)
    assert client.get("/batches").status_code == 500
    assert fault.times == 5  # the emulator spends its own copy

    emulator.clear_faults()

    assert client.get("/batches").status_code == 200


# --- Files ----------------------------------------------------------------------------------------------------

FILE_FIELDS = [
    "id",
    "object",
    "bytes",
    "created_at",
    "expires_at",
    "filename",
    "purpose",
    "status",
    "status_details",
]


def jsonl(content: bytes) -> list[dict]:
    return [json.loads(line) for line in content.splitlines()]


def test_every_batch_has_an_input_file_with_one_request_line_per_request(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    batch = emulator.add_batch(total_requests=7, endpoint="/v1/embeddings")

    meta = client.get(f"/files/{batch['input_file_id']}").json()
    content = client.get(f"/files/{batch['input_file_id']}/content").content

    assert list(meta) == FILE_FIELDS
    assert (meta["id"], meta["object"], meta["purpose"]) == (batch["input_file_id"], "file", "batch")
    assert meta["bytes"] == len(content) and meta["created_at"] == batch["created_at"]
    requests = jsonl(content)
    assert [request["custom_id"] for request in requests] == [f"request-{n}" for n in range(1, 8)]
    assert all(set(request) == {"custom_id", "method", "url", "body"} for request in requests)
    assert {(request["method"], request["url"]) for request in requests} == {("POST", "/v1/embeddings")}
    assert content.endswith(b"\n") and content.count(b"\n") == 7


def test_input_lines_can_be_padded_to_a_size(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    batch = emulator.add_batch(total_requests=20, request_bytes=1000)

    content = client.get(f"/files/{batch['input_file_id']}/content").content

    assert [len(line) for line in content.splitlines(keepends=True)] == [1000] * 20
    assert emulator.file(batch["input_file_id"])["bytes"] == 20_000
    assert len(jsonl(content)) == 20


def test_a_cancelled_batch_has_output_and_error_files_matching_its_counts(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    batch_id = emulator.add_batch(total_requests=30, cancel_after_polls=1)["id"]
    client.post(f"/batches/{batch_id}/cancel")
    final = client.get(f"/batches/{batch_id}").json()
    assert final["status"] == "cancelled"
    assert final["request_counts"] == {"total": 30, "completed": 10, "failed": 1}

    inputs = [line["custom_id"] for line in jsonl(emulator.file_content(final["input_file_id"]))]
    output = jsonl(client.get(f"/files/{final['output_file_id']}/content").content)
    errors = jsonl(client.get(f"/files/{final['error_file_id']}/content").content)

    assert len(output) == 10 and len(errors) == 1
    assert all(list(line) == ["id", "custom_id", "response", "error"] for line in output + errors)
    assert {line["response"]["status_code"] for line in output} == {200}
    assert all(
        line["response"]["body"]["object"] == "chat.completion" and line["error"] is None for line in output
    )
    assert errors[0]["response"]["status_code"] == 400 and "error" in errors[0]["response"]["body"]
    ran = [line["custom_id"] for line in output + errors]
    assert len(set(ran)) == 11 and set(ran) <= set(inputs)
    assert ran != sorted(ran, key=inputs.index), "results are not listed in input order"
    for file_id in (final["output_file_id"], final["error_file_id"]):
        meta = client.get(f"/files/{file_id}").json()
        assert meta["purpose"] == "batch_output" and meta["bytes"] == len(emulator.file_content(file_id))
        assert meta["created_at"] == final["cancelled_at"]
    again = client.get(f"/files/{final['output_file_id']}/content").content
    assert jsonl(again) == output, "a file's content does not change between downloads"


def test_result_counts_can_be_chosen_and_an_empty_result_file_has_no_id(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    half = emulator.add_batch(status="cancelled", total_requests=10, completed_requests=5, failed_requests=0)
    none_ran = emulator.add_batch(status="expired", total_requests=4, completed_requests=0, failed_requests=0)

    assert half["request_counts"] == {"total": 10, "completed": 5, "failed": 0}
    assert half["error_file_id"] is None
    assert len(jsonl(client.get(f"/files/{half['output_file_id']}/content").content)) == 5
    assert none_ran["output_file_id"] is None and none_ran["error_file_id"] is None
    for completed, failed in [(5, None), (None, 1), (-1, 1), (8, 3)]:
        with pytest.raises(ValueError, match="completed_requests and failed_requests"):
            emulator.add_batch(total_requests=10, completed_requests=completed, failed_requests=failed)


def test_seeded_files_are_served_and_replace_a_batchs_own(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    own = emulator.add_file('{"custom_id": "a"}\n', filename="mine.jsonl", purpose="batch")
    assert own == emulator.file(own["id"]) == client.get(f"/files/{own['id']}").json()
    assert (own["bytes"], own["filename"]) == (19, "mine.jsonl")

    requests = b"".join(b'{"custom_id": "q%d", "method": "POST"}\n' % n for n in range(6))
    batch = emulator.add_batch(status="cancelled", total_requests=6, completed_requests=3, failed_requests=1)
    emulator.add_file(requests, batch["input_file_id"])
    assert client.get(f"/files/{batch['input_file_id']}/content").content == requests
    ran = jsonl(emulator.file_content(batch["output_file_id"])) + jsonl(
        emulator.file_content(batch["error_file_id"])
    )
    assert {line["custom_id"] for line in ran} <= {f"q{n}" for n in range(6)} and len(ran) == 4

    emulator.add_file(b"short", batch["error_file_id"], bytes=1000)
    assert client.get(f"/files/{batch['error_file_id']}").json()["bytes"] == 1000
    assert client.get(f"/files/{batch['error_file_id']}/content").content == b"short"


@pytest.mark.parametrize("path", ["/files/file-none", "/files/file-none/content"])
def test_unknown_and_removed_files_are_404s(
    emulator: BatchAPIEmulator, client: httpx.Client, path: str
) -> None:
    batch = emulator.add_batch(status="cancelled")
    emulator.remove_file(batch["output_file_id"])

    for missing in (path, path.replace("file-none", batch["output_file_id"])):
        response = client.get(missing)
        assert response.status_code == 404
        file_id = missing.split("/")[2]
        assert envelope(response) == {
            "message": f"No such File object: {file_id}",
            "type": "invalid_request_error",
            "param": "id",
            "code": None,
        }
    with pytest.raises(KeyError):
        emulator.file_content(batch["output_file_id"])
    assert client.get(f"/files/{batch['input_file_id']}").status_code == 200


def test_files_need_the_key(emulator: BatchAPIEmulator) -> None:
    batch = emulator.add_batch()
    response = httpx.get(f"{emulator.base_url}/files/{batch['input_file_id']}/content")
    assert response.status_code == 401


def test_a_drop_cuts_a_download_halfway_through_the_file(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    batch = emulator.add_batch(total_requests=50)
    path = f"/files/{batch['input_file_id']}/content"
    content = emulator.file_content(batch["input_file_id"])
    emulator.inject(Fault("drop", path="/content$"))

    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", path) as response:
        assert response.headers["content-length"] == str(len(content))
        for chunk in response.iter_bytes():
            received += chunk

    assert bytes(received) == content[: len(content) // 2]
    assert client.get(path).content == content, "the next download is whole"
    assert [request.status for request in emulator.requests] == [0, 200]


def test_status_and_delay_faults_apply_to_downloads(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    batch = emulator.add_batch()
    path = f"/files/{batch['input_file_id']}/content"
    emulator.inject(Fault("status", status=503, path="/content$"))
    emulator.inject(Fault("delay", delay=1.0, path="/content$"))

    assert client.get(path).status_code == 503
    with pytest.raises(httpx.ReadTimeout):
        client.get(path, timeout=0.2)
    assert client.get(f"/files/{batch['input_file_id']}").status_code == 200, "the metadata is not matched"


def test_control_client_seeds_and_removes_files(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    control = EmulatorControl(emulator.base_url)

    seeded = control.add_file('{"custom_id": "x"}\n', "file-ctl", purpose="batch_output")

    assert seeded == client.get("/files/file-ctl").json() and seeded["purpose"] == "batch_output"
    assert client.get("/files/file-ctl/content").text == '{"custom_id": "x"}\n'
    control.remove_file("file-ctl")
    assert client.get("/files/file-ctl").status_code == 404


# --- Recording ----------------------------------------------------------------------------------------------


def test_requests_are_recorded_as_received(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    emulator.add_batch("batch_r")
    started = time.monotonic()
    client.get("/batches", params={"limit": "5", "api-version": "v"}, headers={"X-Trace": "t1"})
    client.post("/batches/batch_r/cancel", content=b'{"reason": "test"}')
    httpx.get(f"{emulator.base_url}/batches")
    EmulatorControl(emulator.base_url).batch("batch_r")  # control requests are not recorded

    first, second, third = emulator.requests

    assert isinstance(first, RecordedRequest)
    assert (first.method, first.path, first.status) == ("GET", "/v1/batches", 200)
    assert first.query == {"limit": "5", "api-version": "v"}
    assert first.headers["x-trace"] == "t1"
    assert first.headers["authorization"] == f"Bearer {DEFAULT_API_KEY}"
    assert all(name == name.lower() for name in first.headers)
    assert first.body == b""
    assert (second.method, second.path, second.status) == ("POST", "/v1/batches/batch_r/cancel", 200)
    assert second.body == b'{"reason": "test"}'
    assert third.status == 401
    assert started <= first.at <= second.at <= third.at <= time.monotonic()

    emulator.clear_requests()
    assert emulator.requests == []


def test_requests_record_the_batch_status_they_were_answered(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.add_batch("batch_b", finish_after_polls=2)
    emulator.inject(Fault("delay", path="/batches/batch_b$"))
    client.get("/batches/batch_b")  # answered after a delay: still a batch
    client.get("/batches/batch_b")
    client.get("/batches")
    client.get("/batches/batch_missing")
    client.post("/batches/batch_b/cancel")
    emulator.inject(Fault("status", status=500))
    client.get("/batches/batch_b")

    recorded = [(r.method, r.status, r.batch_status) for r in emulator.requests]

    assert recorded == [
        ("GET", 200, "in_progress"),
        ("GET", 200, "completed"),
        ("GET", 200, None),
        ("GET", 404, None),
        ("POST", 409, None),
        ("GET", 500, None),
    ]


def test_cancel_count_includes_rejected_cancels(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    emulator.add_batch("batch_c", status="completed")
    client.post("/batches/batch_c/cancel")
    httpx.post(f"{emulator.base_url}/batches/batch_c/cancel")
    client.post("/batches/batch_unknown/cancel")
    client.get("/batches/batch_c")

    assert emulator.cancel_count("batch_c") == 2
    assert emulator.cancel_count("batch_unknown") == 1
    assert emulator.cancel_count("batch_never") == 0


# --- Control endpoints -------------------------------------------------------------------------------------


def test_control_client_drives_the_emulator_out_of_process(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    control = EmulatorControl(emulator.base_url)
    seeded = control.add_batch(batch_id="batch_ctl", metadata={"team": "ads"}, cancel_after_polls=1)
    assert seeded == emulator.batch("batch_ctl")

    client.post("/batches/batch_ctl/cancel")
    client.get("/batches/batch_ctl")
    state = control.batch("batch_ctl")
    assert state["status"] == "cancelled"
    assert (state["cancel_requests"], state["polls"]) == (1, 1)

    control.inject(Fault("status", status=418, body=b"teapot", content_type="text/plain", path="/batches$"))
    response = client.get("/batches")
    assert (response.status_code, response.text) == (418, "teapot")

    recorded = control.requests()
    assert [(r["method"], r["path"], r["status"]) for r in recorded] == [
        ("POST", "/v1/batches/batch_ctl/cancel", 200),
        ("GET", "/v1/batches/batch_ctl", 200),
        ("GET", "/v1/batches", 418),
    ]
    assert recorded[0]["headers"]["authorization"] == "***"
    assert DEFAULT_API_KEY not in json.dumps(recorded)
    assert recorded[0]["body"] == "" and recorded[0]["query"] == {}
    assert [r["batch_status"] for r in recorded] == ["cancelling", "cancelled", None]


def test_control_client_seeds_batches_that_finish_by_themselves(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    control = EmulatorControl(emulator.base_url)
    control.add_batch(batch_id="batch_fin", finish_after_polls=2, finish_as="expired")

    assert [client.get("/batches/batch_fin").json()["status"] for _ in range(2)] == ["in_progress", "expired"]
    assert control.batch("batch_fin")["polls"] == 2

    with pytest.raises(httpx.HTTPStatusError) as caught:
        control.add_batch(finish_after_polls=-1)
    assert caught.value.response.status_code == 400
    message = envelope(caught.value.response)["message"]
    assert message == "finish_after_polls must be at least 1 (1: the first look), not -1."


def test_control_endpoint_errors(emulator: BatchAPIEmulator) -> None:
    root = emulator.base_url.removesuffix("/v1") + "/_emulator"
    assert httpx.get(f"{root}/batches/batch_none").status_code == 404
    assert httpx.post(f"{root}/batches", content=b"[1]").status_code == 400
    assert httpx.post(f"{root}/batches", content=b"{bad").status_code == 400
    assert httpx.post(f"{root}/batches", json={"status": "running"}).status_code == 400
    assert httpx.post(f"{root}/faults", json={"kind": "status", "unknown": 1}).status_code == 400
    assert httpx.get(f"{root}/nothing").status_code == 404
    with pytest.raises(httpx.HTTPStatusError):
        EmulatorControl(emulator.base_url).batch("batch_none")
    assert emulator.requests == []


# --- Server lifecycle ---------------------------------------------------------------------------------------


def test_stop_closes_the_port_and_every_connection_and_thread() -> None:
    emulator = BatchAPIEmulator().start()
    port = emulator.port
    keep_alive = httpx.Client(base_url=emulator.base_url, headers={"api-key": emulator.api_key})
    assert keep_alive.get("/batches").status_code == 200  # its connection stays open, idle
    assert emulator_threads()

    started = time.monotonic()
    emulator.stop()

    assert time.monotonic() - started < 2
    assert not port_is_open(port)
    assert emulator_threads() == []
    with pytest.raises(httpx.TransportError):
        keep_alive.get("/batches")
    keep_alive.close()
    emulator.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = emulator.port


def test_stop_does_not_wait_for_a_delayed_answer() -> None:
    emulator = BatchAPIEmulator().start()
    emulator.inject(Fault("delay", delay=30))
    outcome: list[object] = []

    def slow_request() -> None:
        try:
            outcome.append(httpx.get(f"{emulator.base_url}/batches", timeout=60))
        except httpx.TransportError as exc:
            outcome.append(exc)

    requester = threading.Thread(target=slow_request)
    requester.start()
    time.sleep(0.3)  # the request is now waiting out its delay

    started = time.monotonic()
    emulator.stop()
    requester.join(5)

    assert time.monotonic() - started < 2
    assert isinstance(outcome[0], httpx.TransportError)
    assert emulator_threads() == []


def test_start_twice_fails_and_restart_works() -> None:
    emulator = BatchAPIEmulator()
    with pytest.raises(RuntimeError):
        _ = emulator.base_url
    with emulator:
        with pytest.raises(RuntimeError, match="already running"):
            emulator.start()
        emulator.add_batch("batch_kept")
    with emulator:
        response = httpx.get(f"{emulator.base_url}/batches/batch_kept", headers={"api-key": emulator.api_key})
        assert response.status_code == 200


def test_many_concurrent_keep_alive_clients(emulator: BatchAPIEmulator) -> None:
    ids = [batch["id"] for batch in emulator.add_batches(50, cancel_after_polls=3)]
    failures: list[BaseException] = []

    def poller(batch_id: str) -> None:
        try:
            with httpx.Client(base_url=emulator.base_url, headers={"api-key": emulator.api_key}) as http:
                assert http.post(f"/batches/{batch_id}/cancel").status_code == 200
                statuses = [http.get(f"/batches/{batch_id}").json()["status"] for _ in range(5)]
                assert statuses == ["cancelling", "cancelling", "cancelled", "cancelled", "cancelled"]
                assert http.get("/files").status_code == 200  # not a list of batches: a look at all of them
        except BaseException as exc:  # noqa: BLE001 - reported below, from the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=poller, args=(batch_id,)) for batch_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert failures == []
    assert len(emulator.requests) == 50 * 7


# --- Command line, demo seed and pytest plugin -------------------------------------------------------------


def test_seed_demo(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    seeded = {batch["id"]: batch for batch in seed_demo(emulator)}

    assert list(seeded) == [
        "batch_demo_search_1", "batch_demo_search_2", "batch_demo_search_3", "batch_demo_completed",
        "batch_demo_stale", "batch_demo_other_team",
    ]  # fmt: skip
    assert seeded["batch_demo_completed"]["status"] == "completed"
    assert seeded["batch_demo_stale"]["metadata"] == {"team": "search", "purpose": "nightly-eval"}
    assert seeded["batch_demo_stale"]["created_at"] <= time.time() - 3 * 86400 + 5
    assert seeded["batch_demo_other_team"]["metadata"] == {"team": "ads"}
    listed = [batch["id"] for batch in client.get("/batches").json()["data"]]
    assert listed[-2:] == ["batch_demo_other_team", "batch_demo_stale"]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_command_line_serves_until_signalled(stop_signal: signal.Signals) -> None:
    command = [sys.executable, "-m", "airflow_provider_openai_batch.testing", "--port", "0", "--seed", "demo"]
    command += ["--api-key", "sk-cli-0123456789", "--cancel-after-polls", "1", "--step-after-polls", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "the emulator printed nothing"
        line = process.stdout.readline()  # type: ignore[union-attr]
        match = re.fullmatch(r"OpenAI Batch API emulator listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert match, line
        url, port = match.group(1), int(match.group(2))
        headers = {"Authorization": "Bearer sk-cli-0123456789"}

        with httpx.Client(base_url=url, headers=headers) as http:
            assert len(http.get("/batches").json()["data"]) == 6
            http.post("/batches/batch_demo_search_1/cancel")
            assert http.get("/batches/batch_demo_search_1").json()["status"] == "cancelled"
            assert EmulatorControl(url).batch("batch_demo_search_1")["cancel_requests"] == 1
            uploaded = http.post(
                "/files", files={"file": ("r.jsonl", requests_jsonl(2))}, data={"purpose": "batch"}
            )
            created = http.post("/batches", json={**CREATE, "input_file_id": uploaded.json()["id"]}).json()
            polled = [http.get(f"/batches/{created['id']}").json()["status"] for _ in range(2)]
            assert polled == ["validating", "in_progress"], "two GETs per step"
    finally:
        process.send_signal(stop_signal)
        _stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert stderr == ""
    assert not port_is_open(port)


def test_pytest_plugin_fixture_serves_a_fresh_emulator(openai_batch_emulator: BatchAPIEmulator) -> None:
    assert openai_batch_emulator.base_url == f"http://127.0.0.1:{openai_batch_emulator.port}/v1"
    assert openai_batch_emulator.api_key == DEFAULT_API_KEY
    assert openai_batch_emulator.requests == []
    assert port_is_open(openai_batch_emulator.port)
