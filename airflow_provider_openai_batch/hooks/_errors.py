"""What an answer of the Batch API means: a parsed model, or the provider's exception for it.

Sans-I/O: these functions take what came back (an ``httpx.Response`` or the transport error raised instead) and
return a model or raise from :mod:`airflow_provider_openai_batch.exceptions`. The hook's sync and async paths
both end in them, so an answer means the same thing whichever path received it, and every message is worded
once, here.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from airflow_provider_openai_batch.exceptions import (
    BatchNotCancellableError,
    BatchNotFoundError,
    OpenAIBatchAPIError,
    OpenAIBatchAuthenticationError,
    OpenAIBatchConnectionError,
    OpenAIBatchGatewayError,
    OpenAIBatchRateLimitError,
    OpenAIBatchResponseError,
    OpenAIFileDownloadError,
    OpenAIFileNotFoundError,
)
from airflow_provider_openai_batch.hooks._retry import Failure, Outcome, is_rate_limited
from airflow_provider_openai_batch.ids import validate_batch_id
from airflow_provider_openai_batch.models import FINISHED_STATUSES, Batch

ModelT = TypeVar("ModelT", bound=BaseModel)

#: OpenAI's wording of a refused cancel, the one that names the batch's status.
NOT_CANCELLABLE = re.compile(r"Cannot cancel a batch with status '(?P<status>[a-z_]+)'")
#: A request id fit to quote: OpenAI's are ``req_`` and 32 hex digits; anything else a server sends is dropped.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def successful(
    outcome: Outcome, api_key: str, *, batch_id: str | None = None, file_id: str | None = None
) -> httpx.Response:
    """Return a 2xx response, or raise the provider error matching ``outcome``.

    Called once the retries are over, so what it raises is final: a transport error means no answer came at all,
    a decoding error that the one that came cannot be read.
    """
    if isinstance(outcome, httpx.DecodingError):
        raise OpenAIBatchResponseError(
            f"OpenAI Batch API answered for {subject(batch_id, file_id)} with a body that cannot be decoded "
            f"(a proxy or CDN may have mislabelled its encoding): {describe(outcome)}.",
            batch_id=batch_id,
            file_id=file_id,
        ) from outcome
    if isinstance(outcome, httpx.TransportError):
        raise OpenAIBatchConnectionError(
            f"No response from the OpenAI Batch API for {subject(batch_id, file_id)}: {describe(outcome)}.",
            batch_id=batch_id,
            file_id=file_id,
        ) from outcome
    if outcome.is_success:
        return outcome
    raise api_error(outcome, api_key, batch_id, file_id)


def api_error(
    response: httpx.Response, api_key: str, batch_id: str | None, file_id: str | None
) -> OpenAIBatchAPIError:
    """Map an error response to the provider's exception for it, keeping the API's own message.

    One class per decision a caller makes differently. A refused cancel is a 409, or a 400 on some deployments
    whose message still names the status; the status is read from OpenAI's wording only, because Azure and
    gateways word the conflict their own way: then ``batch_status`` is ``None`` and the hook looks the batch up
    (:func:`unsettled`, :func:`settled`). A 401 or 403 without OpenAI's JSON error envelope was written by a
    proxy or CDN in front of the API (a bot challenge page, say), not by the API judging the key: it maps to the
    transient :class:`OpenAIBatchGatewayError`, so a wait polls on instead of failing as if the key were wrong.
    Every message ends with the response's request id, when it has one, because OpenAI support asks for it.
    """
    status = response.status_code
    api_message = error_message(response, api_key)
    what = subject(batch_id, file_id)
    request_id = request_id_of(response, api_key)
    reference = f" (request id {request_id})" if request_id else ""
    detail = (f": {api_message}" if api_message else ".") + reference
    kwargs: dict[str, Any] = {
        "batch_id": batch_id,
        "status_code": status,
        "api_message": api_message,
        "request_id": request_id,
    }
    if file_id:
        kwargs["file_id"] = file_id
        if status == 404:
            return OpenAIFileNotFoundError(f"OpenAI Batch API found no {what} (HTTP 404){detail}", **kwargs)
    not_cancellable = NOT_CANCELLABLE.search(api_message or "")
    if status == 409 or (status == 400 and not_cancellable):
        batch_status = not_cancellable["status"] if not_cancellable else None
        return BatchNotCancellableError(
            f"Cannot cancel {what} (HTTP {status}): it is {batch_status or 'no longer cancellable'}{detail}",
            batch_status=batch_status,
            **kwargs,
        )
    if status == 404:
        return BatchNotFoundError(f"OpenAI Batch API found no {what} (HTTP 404){detail}", **kwargs)
    if status in (401, 403) and api_message is None and not is_json(response):
        return OpenAIBatchGatewayError(
            f"A proxy or CDN answered for {what} instead of the OpenAI Batch API (HTTP {status}, "
            f"{response.headers.get('content-type', 'no content type')}); treated as transient{reference}.",
            **kwargs,
        )
    if status in (401, 403):
        return OpenAIBatchAuthenticationError(
            f"OpenAI Batch API refused the credentials for {what} (HTTP {status}){detail}", **kwargs
        )
    if is_rate_limited(response):
        return OpenAIBatchRateLimitError(
            f"OpenAI Batch API is still rate limiting requests for {what} after all retries (HTTP {status}){detail}",
            **kwargs,
        )
    return OpenAIBatchAPIError(
        f"OpenAI Batch API request for {what} failed with HTTP {status}{detail}", **kwargs
    )


def request_id_of(response: httpx.Response, api_key: str) -> str | None:
    """The response's ``x-request-id``, if it is one fit to quote (never the key, should a server echo it)."""
    request_id = response.headers.get("x-request-id", "").strip()
    if not _REQUEST_ID.fullmatch(request_id) or (api_key and api_key in request_id):
        return None
    return request_id


def error_message(response: httpx.Response, api_key: str) -> str | None:
    """The ``error.message`` of an OpenAI error envelope, if the body is one, with the key blanked out.

    A proxy or gateway may quote the request's headers back; the message ends up in exceptions, trigger events
    and XComs, which the log masker does not cover. The body is parsed by :func:`json_value`: nested too deep,
    it is no envelope.
    """
    try:
        error = json_value(response.content).get("error")
    except (ValueError, AttributeError):
        return None
    message = error.get("message") if isinstance(error, dict) else None
    return message.replace(api_key, "***") if isinstance(message, str) else None


def json_value(data: bytes | str) -> Any:
    """``data`` parsed as JSON, nesting bounded: ``ValueError`` if it is not JSON or nests more than 200 deep.

    What the API sends back (an error body, a line of a results file) is parsed here rather than by
    ``json.loads``, whose nesting is bounded only by the interpreter's recursion limit: ``"[" * 100_000`` raised
    ``RecursionError``. pydantic-core's parser, which already reads every model of the API, stops at its own
    limit with a ``ValueError``; and it accepts what ``json.loads`` accepts (``NaN``, repeated keys: the last
    one wins).
    """
    return from_json(data)


def is_json(response: httpx.Response) -> bool:
    """Whether the body claims to be JSON: an error page a proxy wrote is HTML or text, the API's is JSON."""
    return "json" in response.headers.get("content-type", "")


def parse(
    response: httpx.Response, model: type[ModelT], batch_id: str | None = None, *, file_id: str | None = None
) -> ModelT:
    """The 2xx ``response``'s body as ``model``.

    A body that does not fit (an HTML page from a load balancer, a truncated document) raises the transient
    :class:`OpenAIBatchResponseError` with the first validation error only, never the body: it may be large, and
    it is not the API's to quote.
    """
    try:
        return model.model_validate_json(response.content)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise OpenAIBatchResponseError(
            f"OpenAI Batch API answered HTTP {response.status_code} for {subject(batch_id, file_id)} with a body "
            f"that is not a valid {model.__name__} ({response.headers.get('content-type', 'no content type')}; "
            f"{error.error_count()} error(s), first at {where}: {first['msg']}).",
            batch_id=batch_id,
            file_id=file_id,
            status_code=response.status_code,
        ) from None


def advancing(cursor: str, sent: set[str]) -> str:
    """``cursor``, the ``after`` of a list's next page, once checked; it joins ``sent``, the cursors this listing
    already sent (its first ``after`` included).

    A cursor that is not a batch id, or that was sent before (the server ignores ``after``, or its pages loop)
    raises :class:`OpenAIBatchResponseError`: following it would read the same pages for ever.
    """
    try:
        validate_batch_id(cursor)
    except ValueError as error:
        raise OpenAIBatchResponseError(
            f"OpenAI Batch API answered the batch list with a next-page cursor that is not a batch id: {error}"
        ) from None
    if cursor in sent:
        raise OpenAIBatchResponseError(
            f"OpenAI Batch API answered the batch list with the cursor '{cursor}' a second time: the list does "
            "not advance (does the server ignore 'after'?), so the listing stops here."
        )
    sent.add(cursor)
    return cursor


def unsettled(conflict: BatchNotCancellableError) -> BatchNotCancellableError:
    """Re-raise a refused cancel whose message names a finished status; return the others, to look the batch up."""
    if conflict.batch_status in FINISHED_STATUSES:
        raise conflict
    return conflict


def settled(conflict: BatchNotCancellableError, batch: Batch) -> Batch:
    """Decide a refused cancel on the batch's real status: finished raises, anything else (``cancelling``,
    ``cancelled``, or a status the refusal did not explain) is returned for the caller to wait on or report."""
    if batch.status in FINISHED_STATUSES:
        reference = f" (request id {conflict.request_id})" if conflict.request_id else ""
        raise BatchNotCancellableError(
            f"Cannot cancel batch '{batch.id}': it is {batch.status} (HTTP {conflict.status_code}).{reference}",
            batch_id=batch.id,
            status_code=conflict.status_code,
            api_message=conflict.api_message,
            request_id=conflict.request_id,
            batch_status=batch.status,
        ) from conflict
    return batch


def finished(conflict: BatchNotCancellableError, batch: Batch) -> Batch:
    """``batch``, retrieved after ``conflict`` refused its cancel because it had finished: it must be final.

    A status that is not (``cancelling``, or one this provider does not know) contradicts the refusal, and
    cannot say how the batch ended: :class:`OpenAIBatchResponseError`, naming both answers.
    """
    if batch.is_terminal:
        return batch
    raise OpenAIBatchResponseError(
        f"OpenAI Batch API refused to cancel batch '{batch.id}' as {conflict.batch_status or 'finished'} "
        f"(HTTP {conflict.status_code}), then reported it '{batch.status}', which is not a final status: "
        "cannot tell how it ended.",
        batch_id=batch.id,
        status_code=conflict.status_code,
    ) from conflict


def cut_short(error: Failure, file_id: str, received: int) -> OpenAIFileDownloadError:
    """The error for a file's content lost mid-stream: the chunks already handed out cannot be taken back."""
    return OpenAIFileDownloadError(
        f"Download of file '{file_id}' was cut short after {received} bytes: {describe(error)}.",
        file_id=file_id,
        received_bytes=received,
    )


def describe(outcome: Outcome) -> str:
    """``outcome`` in a few words for a message or a log line: its HTTP status, or the transport error."""
    if isinstance(outcome, httpx.Response):
        return f"HTTP {outcome.status_code}"
    return f"{type(outcome).__name__} ({outcome})" if str(outcome) else type(outcome).__name__


def subject(batch_id: str | None, file_id: str | None = None) -> str:
    """What a request was about, as messages name it."""
    if file_id:
        return f"file '{file_id}'"
    return f"batch '{batch_id}'" if batch_id else "the batch list"
