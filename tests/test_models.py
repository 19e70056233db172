from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from airflow_provider_openai_batch.models import (
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_LENGTH,
    Batch,
    BatchList,
    BatchStatus,
    File,
    check_metadata,
)
from airflow_provider_openai_batch.testing import BatchAPIEmulator

SPEC = yaml.safe_load((Path(__file__).parent / "fixtures" / "openai-batch-spec.yaml").read_text())


def spec_json(text: str) -> dict:
    """The spec's examples are JSON with trailing commas (and a '{ ... }' placeholder in the list)."""
    text = text.replace("{ ... },", "")
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", text))


def spec_examples() -> dict[str, dict]:
    paths = SPEC["paths"]
    return {
        "schema": spec_json(SPEC["components"]["schemas"]["Batch"]["x-oaiMeta"]["example"]),
        "create": spec_json(paths["/batches"]["post"]["x-oaiMeta"]["examples"]["response"]),
        "retrieve": spec_json(paths["/batches/{batch_id}"]["get"]["x-oaiMeta"]["examples"]["response"]),
        "cancel": spec_json(paths["/batches/{batch_id}/cancel"]["post"]["x-oaiMeta"]["examples"]["response"]),
    }


def test_batch_has_every_field_of_the_spec() -> None:
    spec_batch = SPEC["components"]["schemas"]["Batch"]
    assert set(Batch.model_fields) == set(spec_batch["properties"])
    assert len(Batch.model_fields) == 22
    required = {name for name, field in Batch.model_fields.items() if field.is_required()}
    assert required == set(spec_batch["required"])


def test_status_enum_matches_the_spec() -> None:
    spec_statuses = SPEC["components"]["schemas"]["Batch"]["properties"]["status"]["enum"]
    assert {status.value for status in BatchStatus} == set(spec_statuses)


def test_emulator_creates_batches_for_the_specs_endpoints() -> None:
    from airflow_provider_openai_batch.testing._wire import ENDPOINTS

    endpoint = SPEC["components"]["schemas"]["CreateBatchRequest"]["properties"]["endpoint"]
    assert set(endpoint["enum"]) == ENDPOINTS


def test_metadata_limits_are_the_specs() -> None:
    [as_object, _] = SPEC["components"]["schemas"]["Metadata"]["anyOf"]
    described = " ".join(as_object["description"].split())
    assert f"Set of {MAX_METADATA_KEYS} key-value pairs" in described
    assert f"Keys are strings with a maximum length of {MAX_METADATA_KEY_LENGTH} characters" in described
    assert f"Values are strings with a maximum length of {MAX_METADATA_VALUE_LENGTH} characters" in described
    check_metadata({f"{n:02d}".ljust(64, "k"): "v" * 512 for n in range(16)})  # right at every limit


@pytest.mark.parametrize("name", ["schema", "create", "retrieve", "cancel"])
def test_parses_the_spec_examples(name: str) -> None:
    data = spec_examples()[name]
    batch = Batch.model_validate(data)
    assert batch.id == "batch_abc123"
    assert batch.status == BatchStatus(data["status"])
    assert isinstance(batch.status, BatchStatus)
    assert batch.request_counts is not None and batch.request_counts.total == data["request_counts"]["total"]
    assert batch.metadata == data["metadata"]


def test_schema_example_details() -> None:
    batch = Batch.model_validate(spec_examples()["schema"])
    assert batch.usage is not None
    assert batch.usage.input_tokens_details.cached_tokens == 1024
    assert batch.usage.output_tokens_details.reasoning_tokens == 300
    assert batch.output_file_id == "file-cvaTdG"
    assert batch.is_terminal and not batch.is_cancellable


def test_cancel_example_is_cancelling_without_output() -> None:
    batch = Batch.model_validate(spec_examples()["cancel"])
    assert batch.status is BatchStatus.CANCELLING
    assert batch.output_file_id is None
    assert not batch.is_terminal and not batch.is_cancellable


def test_list_example() -> None:
    page = BatchList.model_validate(
        spec_json(SPEC["paths"]["/batches"]["get"]["x-oaiMeta"]["examples"]["response"])
    )
    assert page.has_more is True
    assert page.last_id == "batch_abc456"
    assert [batch.id for batch in page.data] == ["batch_abc123"]


def test_nulls_are_accepted_for_every_optional_field() -> None:
    data = spec_examples()["schema"]
    optional = [name for name, field in Batch.model_fields.items() if not field.is_required()]
    batch = Batch.model_validate({**data, **dict.fromkeys(optional)})
    assert all(getattr(batch, name) is None for name in optional)


def test_missing_required_field_is_rejected() -> None:
    data = spec_examples()["schema"]
    del data["input_file_id"]
    with pytest.raises(ValidationError, match="input_file_id"):
        Batch.model_validate(data)


def test_unknown_fields_are_kept_through_a_round_trip() -> None:
    data = {**spec_examples()["schema"], "priority": "high", "output_expires_after": {"anchor": "created_at"}}
    dumped = Batch.model_validate(data).to_xcom()
    assert dumped["priority"] == "high"
    assert dumped["output_expires_after"] == {"anchor": "created_at"}


def test_round_trip_is_json_serialisable_and_lossless() -> None:
    data = spec_examples()["schema"]
    dumped = Batch.model_validate(data).model_dump(mode="json")
    assert json.loads(json.dumps(dumped)) == dumped
    assert dumped == data
    assert dumped["status"] == "completed" and type(dumped["status"]) is str


def test_unknown_status_does_not_break_a_list() -> None:
    good = spec_examples()["schema"]
    odd = {**good, "id": "batch_new", "status": "paused_for_review"}
    page = BatchList.model_validate({"object": "list", "data": [good, odd], "has_more": False})
    assert page.data[1].status == "paused_for_review"
    assert not isinstance(page.data[1].status, BatchStatus)
    assert not page.data[1].is_terminal and not page.data[1].is_cancellable
    assert page.data[1].to_xcom()["status"] == "paused_for_review"


@pytest.mark.parametrize("status", list(BatchStatus))
def test_status_sets_are_what_the_api_does(emulator: BatchAPIEmulator, status: BatchStatus) -> None:
    """Over HTTP, against the emulator's model of the API: a cancellable batch is moved to ``cancelling`` by a
    cancel, a terminal one has the cancel refused and never changes again; ``cancelling`` is neither."""
    batch_id = emulator.add_batch(status=status.value, cancel_after_polls=1)["id"]
    auth = {"Authorization": f"Bearer {emulator.api_key}"}
    with httpx.Client(base_url=emulator.base_url, headers=auth) as api:
        cancel = api.post(f"/batches/{batch_id}/cancel")
        polled = [api.get(f"/batches/{batch_id}").json()["status"] for _ in range(2)]
    moved_to_cancelling = cancel.status_code == 200 and cancel.json()["status"] == "cancelling"
    assert status.is_cancellable is (moved_to_cancelling and status != BatchStatus.CANCELLING)
    assert status.is_terminal is (cancel.status_code == 409 and polled == [status.value] * 2)


def test_errors_object() -> None:
    data = {
        **spec_examples()["schema"],
        "status": "failed",
        "errors": {
            "object": "list",
            "data": [{"code": "invalid_json", "message": "bad line", "param": None, "line": 3}],
        },
    }
    batch = Batch.model_validate(data)
    assert batch.errors is not None and batch.errors.data[0].line == 3


def file_example(where: str) -> dict:
    if where == "schema":
        return spec_json(SPEC["components"]["schemas"]["OpenAIFile"]["x-oaiMeta"]["example"])
    return spec_json(SPEC["paths"]["/files/{file_id}"]["get"]["x-oaiMeta"]["examples"]["response"])


def test_file_has_every_field_of_the_spec() -> None:
    spec_file = SPEC["components"]["schemas"]["OpenAIFile"]
    assert set(File.model_fields) == set(spec_file["properties"])
    required = {name for name, field in File.model_fields.items() if field.is_required()}
    # The deprecated status is required by the schema but absent from its own examples: optional here.
    assert required == set(spec_file["required"]) - {"status"}


@pytest.mark.parametrize("where", ["schema", "retrieve"])
def test_parses_the_spec_file_examples(where: str) -> None:
    data = file_example(where)
    file = File.model_validate(data)
    assert file.id == "file-abc123"
    assert file.bytes == data["bytes"] and isinstance(file.bytes, int)
    assert file.status is None
    assert file.model_dump(mode="json", exclude_none=True) == data


def test_file_without_a_size_is_rejected() -> None:
    data = file_example("retrieve")
    del data["bytes"]
    with pytest.raises(ValidationError, match="bytes"):
        File.model_validate(data)


@pytest.mark.parametrize("status", ["cancelled", "completed", "failed", "expired", "timeout", "error"])
def test_a_wait_ends_at_a_final_batch_status_or_a_reason_to_stop(status: str) -> None:
    from airflow_provider_openai_batch.cancellation import CancellationEvent

    event = CancellationEvent.model_validate({"status": status, "batch_id": "batch_1", "message": "..."})
    assert event.to_payload()["status"] == status


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing", "cancelling", "paused"])
def test_a_wait_never_ends_at_a_running_or_unknown_status(status: str) -> None:
    from airflow_provider_openai_batch.cancellation import CancellationEvent

    with pytest.raises(ValidationError, match="status"):
        CancellationEvent.model_validate({"status": status, "batch_id": "batch_1", "message": "..."})
