"""The emulator as the real API behaves, over real HTTP: uploads checked line by line, batches created from them
that run by themselves to ``completed``, the files list, and a request id on every answer."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from airflow_provider_openai_batch.ids import validate_file_id
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault

CHAT = "/v1/chat/completions"


def request_line(custom_id: str, url: str = CHAT, **change: object) -> dict:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": "gpt-4o-mini", "messages": []},
    }
    return {**line, **change}


def jsonl(*lines: dict) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def parsed(content: bytes) -> list[dict]:
    return [json.loads(line) for line in content.splitlines()]


@pytest.fixture
def emulator() -> Iterator[BatchAPIEmulator]:
    with BatchAPIEmulator() as server:
        yield server


@pytest.fixture
def client(emulator: BatchAPIEmulator) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    with httpx.Client(base_url=emulator.base_url, headers=headers, timeout=5) as http:
        yield http


def upload(client: httpx.Client, content: bytes, filename: str = "requests.jsonl", purpose: str = "batch"):
    return client.post("/files", files={"file": (filename, content)}, data={"purpose": purpose})


def create(client: httpx.Client, file_id: str, endpoint: str = CHAT) -> httpx.Response:
    return client.post(
        "/batches", json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    )


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


# --- Uploading -----------------------------------------------------------------------------------------------


def test_an_upload_is_a_file_object_whose_content_comes_back_byte_for_byte(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    content = jsonl(request_line("a"), request_line("b")).replace(b"\n", b"\r\n", 1)  # CRLF survives as is
    response = upload(client, content)

    assert response.status_code == 200, response.text
    file = response.json()
    assert set(file) >= {"id", "object", "bytes", "created_at", "filename", "purpose", "status"}
    assert (file["object"], file["bytes"], file["filename"], file["purpose"]) == (
        "file",
        len(content),
        "requests.jsonl",
        "batch",
    )
    validate_file_id(file["id"])
    assert client.get(f"/files/{file['id']}").json() == file
    assert client.get(f"/files/{file['id']}/content").content == content
    assert emulator.file_content(file["id"]) == content


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([b"not json"], "Line 1 is not a JSON object."),
        ([request_line("a"), [1, 2]], "Line 2 is not a JSON object."),
        ([request_line("a"), request_line("")], "Line 2 has no 'custom_id'"),
        ([request_line("a"), {"method": "POST", "url": CHAT, "body": {}}], "Line 2 has no 'custom_id'"),
        (
            [request_line("a"), request_line("b"), request_line("a")],
            "Line 3 repeats the custom_id 'a' of line 1",
        ),
        ([request_line("a", method="GET")], "Line 1 has 'method' 'GET'; only 'POST' is supported."),
        (
            [request_line("a", url="/v1/files")],
            "Line 1 has 'url' '/v1/files', which is not a batch endpoint.",
        ),
        (
            [request_line("a"), request_line("b", url="/v1/embeddings")],
            "Line 2 has 'url' '/v1/embeddings', but",
        ),
        ([request_line("a", body="hi")], "Line 1 has no 'body' (a JSON object)."),
        ([], "The file holds no request."),
    ],
    ids=[
        "not-json",
        "not-object",
        "empty-id",
        "no-id",
        "duplicate-id",
        "get",
        "bad-url",
        "two-urls",
        "body",
        "empty",
    ],
)
def test_a_bad_batch_input_line_is_a_400_that_names_it(
    emulator: BatchAPIEmulator, client: httpx.Client, lines: list, message: str
) -> None:
    content = b"".join(
        line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n" for line in lines
    )
    response = upload(client, content)

    assert response.status_code == 400
    assert message in error_of(response)["message"]
    assert error_of(response)["param"] == "file"
    assert client.get("/files").json()["data"] == [], "nothing was stored"


@pytest.mark.parametrize(
    ("upload_kwargs", "param", "message"),
    [
        ({"filename": "requests.csv"}, "file", "Invalid file format for Batch API. Must be .jsonl"),
        ({"purpose": "batch_output"}, "purpose", "Invalid value: 'batch_output'."),
    ],
)
def test_an_upload_the_api_refuses_is_a_400(
    client: httpx.Client, upload_kwargs: dict, param: str, message: str
) -> None:
    response = upload(client, jsonl(request_line("a")), **upload_kwargs)
    assert response.status_code == 400
    assert error_of(response)["param"] == param and message in error_of(response)["message"]


def test_an_upload_needs_a_file_and_a_purpose(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    no_file = client.post("/files", files={"purpose": (None, "batch")})
    no_purpose = client.post("/files", files={"file": ("a.jsonl", jsonl(request_line("a")))})
    not_multipart = client.post("/files", json={"purpose": "batch"})

    assert (no_file.status_code, error_of(no_file)["message"]) == (400, "Missing required parameter: 'file'.")
    assert error_of(no_purpose)["message"] == "Missing required parameter: 'purpose'."
    assert not_multipart.status_code == 400 and "multipart/form-data" in error_of(not_multipart)["message"]
    assert httpx.post(f"{emulator.base_url}/files", files={"file": ("a.jsonl", b"x")}).status_code == 401


def test_files_other_than_batch_input_are_stored_unchecked(client: httpx.Client) -> None:
    response = upload(client, b"anything", filename="notes.txt", purpose="user_data")
    assert response.status_code == 200 and response.json()["purpose"] == "user_data"


# --- Listing files -------------------------------------------------------------------------------------------


def test_the_files_list_pages_newest_first_and_filters_by_purpose(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    ids = [upload(client, jsonl(request_line(f"r{n}"))).json()["id"] for n in range(5)]
    other = upload(client, b"x", filename="x.txt", purpose="user_data").json()["id"]
    newest_first = [other, *reversed(ids)]

    everything = client.get("/files").json()
    assert [file["id"] for file in everything["data"]] == newest_first
    assert (everything["object"], everything["has_more"]) == ("list", False)
    assert (everything["first_id"], everything["last_id"]) == (other, ids[0])

    pages, after = [], None
    while True:
        page = client.get("/files", params={"limit": 2, **({"after": after} if after else {})}).json()
        pages.append([file["id"] for file in page["data"]])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:6]]

    batch_files = client.get("/files", params={"purpose": "batch", "order": "asc"}).json()["data"]
    assert [file["id"] for file in batch_files] == ids
    assert client.get("/files", params={"limit": 0}).status_code == 400
    assert client.get("/files", params={"order": "up"}).status_code == 400


def test_the_files_list_holds_the_files_of_batches_and_not_removed_ones(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    batch = emulator.add_batch(status="completed", total_requests=4, completed_requests=4, failed_requests=0)
    listed = {file["id"]: file["purpose"] for file in client.get("/files").json()["data"]}
    assert listed == {batch["input_file_id"]: "batch", batch["output_file_id"]: "batch_output"}

    emulator.remove_file(batch["input_file_id"])
    assert [file["id"] for file in client.get("/files").json()["data"]] == [batch["output_file_id"]]


# --- Creating from an upload ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "limit", "maximum"),
    [("/batches", "0", 100), ("/batches", "101", 100), ("/batches", "ten", 100), ("/files", "10001", 10_000)],
)
def test_a_list_limit_out_of_range_is_a_400_naming_it(
    client: httpx.Client, path: str, limit: str, maximum: int
) -> None:
    response = client.get(path, params={"limit": limit})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "limit"
    assert (
        error["message"]
        == f"Invalid 'limit': expected an integer between 1 and {maximum}, but got '{limit}'."
    )
    assert client.get(path, params={"limit": str(maximum)}).status_code == 200


def test_create_counts_the_requests_of_its_input_file(client: httpx.Client) -> None:
    file_id = upload(client, jsonl(*(request_line(f"r{n}") for n in range(7)))).json()["id"]
    batch = create(client, file_id).json()
    assert (batch["status"], batch["input_file_id"]) == ("validating", file_id)
    assert batch["request_counts"] == {"total": 7, "completed": 0, "failed": 0}


def test_create_refuses_an_input_file_that_does_not_exist(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    response = create(client, "file-nowhere")
    assert response.status_code == 400
    assert error_of(response)["param"] == "input_file_id"
    assert error_of(response)["message"] == "Invalid 'input_file_id': no file with id 'file-nowhere'."
    assert client.get("/batches").json()["data"] == []


def test_create_refuses_requests_to_another_endpoint(client: httpx.Client) -> None:
    file_id = upload(client, jsonl(request_line("a", url="/v1/embeddings"))).json()["id"]
    response = create(client, file_id, endpoint=CHAT)
    assert response.status_code == 400
    assert error_of(response)["param"] == "endpoint"
    assert error_of(response)["message"].startswith(
        f"Line 1 of input file '{file_id}' has 'url' '/v1/embeddings'"
    )
    assert create(client, file_id, endpoint="/v1/embeddings").status_code == 200


def test_create_refuses_a_file_that_is_not_a_batch_input(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    done = emulator.add_batch(status="completed")
    output = create(client, done["output_file_id"])
    emulator.add_file(b'{"custom_id": "a"}\n', "file-seeded-bad")
    seeded_bad = create(client, "file-seeded-bad")

    assert (
        output.status_code == 400 and "has purpose 'batch_output', not 'batch'" in error_of(output)["message"]
    )
    assert seeded_bad.status_code == 400
    assert error_of(seeded_bad)["message"] == (
        "Invalid batch input file 'file-seeded-bad': Line 1 has 'method' None; only 'POST' is supported."
    )


# --- A created batch runs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("step_after_polls", [1, 2])
def test_a_created_batch_runs_to_completed_one_step_per_n_polls(step_after_polls: int) -> None:
    with (
        BatchAPIEmulator(step_after_polls=step_after_polls) as emulator,
        httpx.Client(
            base_url=emulator.base_url, headers={"Authorization": f"Bearer {emulator.api_key}"}
        ) as http,
    ):
        custom_ids = [f"r{n}" for n in range(5)]
        file_id = upload(http, jsonl(*map(request_line, custom_ids))).json()["id"]
        batch_id = create(http, file_id).json()["id"]
        seen = [http.get(f"/batches/{batch_id}").json() for _ in range(3 * step_after_polls + 1)]

        run = ["validating", "in_progress", "finalizing", "completed"]
        assert [batch["status"] for batch in seen] == [
            run[min(k // step_after_polls, 3)] for k in range(1, len(seen) + 1)
        ]
        final = seen[-1]
        assert final["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
        assert final["in_progress_at"] and final["finalizing_at"] and final["completed_at"]
        assert final["error_file_id"] is None
        output = parsed(http.get(f"/files/{final['output_file_id']}/content").content)
        assert sorted(line["custom_id"] for line in output) == custom_ids, "one answer per request line"
        assert all(line["response"]["status_code"] == 200 for line in output)
        assert http.get("/batches").json()["data"][0]["status"] == "completed", (
            "a look at a completed batch changes nothing"
        )


def test_a_created_batch_steps_after_seconds_too() -> None:
    with (
        BatchAPIEmulator(step_after_polls=10**9, step_after_seconds=0.2) as emulator,
        httpx.Client(
            base_url=emulator.base_url, headers={"Authorization": f"Bearer {emulator.api_key}"}
        ) as http,
    ):
        file_id = upload(http, jsonl(request_line("a"))).json()["id"]
        batch_id = create(http, file_id).json()["id"]
        assert http.get(f"/batches/{batch_id}").json()["status"] == "validating"
        time.sleep(0.25)
        assert http.get(f"/batches/{batch_id}").json()["status"] == "in_progress"
        assert http.get(f"/batches/{batch_id}").json()["status"] == "in_progress", (
            "held until the delay again"
        )


def test_seeded_batches_stay_where_they_are_put(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    batch_id = emulator.add_batch(status="validating")["id"]
    assert {client.get(f"/batches/{batch_id}").json()["status"] for _ in range(5)} == {"validating"}


def test_a_batch_cancelled_on_its_way_answers_only_the_requests_that_ran(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    custom_ids = [f"r{n}" for n in range(30)]
    file_id = upload(client, jsonl(*map(request_line, custom_ids))).json()["id"]
    batch_id = create(client, file_id).json()["id"]
    assert client.get(f"/batches/{batch_id}").json()["status"] == "in_progress"
    client.post(f"/batches/{batch_id}/cancel")
    final = {}
    while final.get("status") != "cancelled":
        final = client.get(f"/batches/{batch_id}").json()

    output = parsed(client.get(f"/files/{final['output_file_id']}/content").content)
    errors = parsed(client.get(f"/files/{final['error_file_id']}/content").content)
    ran = [line["custom_id"] for line in output + errors]
    counts = final["request_counts"]
    assert (len(output), len(errors)) == (counts["completed"], counts["failed"])
    assert 0 < len(ran) < 30 and len(set(ran)) == len(ran) and set(ran) < set(custom_ids)


# --- Request ids ---------------------------------------------------------------------------------------------


def test_every_answer_of_the_api_carries_a_request_id(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    batch_id = emulator.add_batch()["id"]
    emulator.inject(Fault("status", status=503, path="/batches$"))
    answers = [
        client.get(f"/batches/{batch_id}"),
        client.get("/batches/batch_nope"),
        client.get("/batches"),  # the 503 fault
        client.get("/nowhere"),
        httpx.get(f"{emulator.base_url}/batches"),  # no key: 401
        upload(client, b"bad"),
    ]
    emulator.limit_rate(0)
    answers.append(client.get("/batches"))  # 429

    assert [answer.status_code for answer in answers] == [200, 404, 503, 404, 401, 400, 429]
    request_ids = [answer.headers["x-request-id"] for answer in answers]
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", request_id) for request_id in request_ids)
    assert len(set(request_ids)) == len(request_ids)
    assert [request.request_id for request in emulator.requests] == request_ids


def test_a_proxy_page_has_no_request_id_unless_given_one(
    emulator: BatchAPIEmulator, client: httpx.Client
) -> None:
    emulator.inject(Fault("body", status=502, body="<html>Bad gateway</html>", content_type="text/html"))
    emulator.inject(Fault("status", status=500, headers={"x-request-id": "req_chosen"}))
    assert "x-request-id" not in client.get("/batches").headers
    assert client.get("/batches").headers["x-request-id"] == "req_chosen"
    assert [request.request_id for request in emulator.requests] == [None, "req_chosen"]


# --- Ids ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_id", ["b" * 256, "batch_" + "x" * 250], ids=["no-prefix", "prefixed"])
def test_the_files_of_a_batch_with_the_longest_id_have_valid_ids(
    emulator: BatchAPIEmulator, client: httpx.Client, batch_id: str
) -> None:
    """Issue 24, defect 14: a valid 256-character batch id once made a 265-character file id."""
    batch = emulator.add_batch(batch_id, status="cancelled")
    other = emulator.add_batch(batch_id[:-1] + "z", status="cancelled")
    file_ids = [batch["output_file_id"], batch["error_file_id"]]

    assert all(validate_file_id(file_id) for file_id in file_ids)
    assert set(file_ids).isdisjoint({other["output_file_id"], other["error_file_id"]})
    assert all(client.get(f"/files/{file_id}/content").status_code == 200 for file_id in file_ids)


def test_an_upload_streamed_in_chunks_is_read_whole(emulator: BatchAPIEmulator, client: httpx.Client) -> None:
    """A client streaming a file of unknown size sends it chunked; the connection stays usable after it."""
    content = jsonl(*(request_line(f"r{n}") for n in range(50)))
    request = httpx.Request("POST", "/files", files={"file": ("r.jsonl", content)}, data={"purpose": "batch"})
    body = request.read()

    def chunks() -> Iterator[bytes]:
        yield from (body[at : at + 1000] for at in range(0, len(body), 1000))

    headers = {"content-type": request.headers["content-type"]}
    response = client.post("/files", content=chunks(), headers=headers)

    assert response.status_code == 200, response.text
    assert emulator.requests[-1].headers["transfer-encoding"] == "chunked"
    assert emulator.file_content(response.json()["id"]) == content
    assert client.get("/files").status_code == 200
