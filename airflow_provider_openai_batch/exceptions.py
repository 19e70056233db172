"""Errors raised by the OpenAI Batch hook.

One base class, :class:`OpenAIBatchError`, so a caller can catch everything the provider raises, and one
subclass per decision a caller makes differently: the batch or file does not exist, the credentials are wrong,
the batch is past cancelling, the API is overloaded, a download did not arrive whole. Every message names the
batch or file (when there is one) and the HTTP status; none ever contains the API key.
"""

from __future__ import annotations

from airflow.providers.common.compat.sdk import AirflowException

from airflow_provider_openai_batch.hooks._retry import is_retryable_status


class OpenAIBatchError(AirflowException):
    """Base class of every error raised by this provider.

    :param message: human-readable description, already naming the batch and the HTTP status.
    :param batch_id: the batch the failed request was about, if any.
    :param status_code: the HTTP status of the last response, or ``None`` when no response arrived.
    :param file_id: the file the failed request was about, if any.
    """

    #: Whether waiting and asking again may succeed (overload, outage, network trouble).
    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        batch_id: str | None = None,
        status_code: int | None = None,
        file_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.batch_id = batch_id
        self.file_id = file_id
        # Named like httpx's and the OpenAI SDK's; an int here, where AirflowException declares an HTTPStatus.
        self.status_code = status_code  # type: ignore[assignment]


class OpenAIBatchAPIError(OpenAIBatchError):
    """The API answered with an error not covered by a more specific class.

    :param api_message: the ``error.message`` from the API's response body, if it sent one.
    :param request_id: the response's ``x-request-id``, if it had one: what OpenAI support asks for.
    """

    def __init__(
        self,
        message: str,
        *,
        batch_id: str | None = None,
        status_code: int | None = None,
        api_message: str | None = None,
        file_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, batch_id=batch_id, status_code=status_code, file_id=file_id)
        self.api_message = api_message
        self.request_id = request_id

    @property
    def transient(self) -> bool:  # type: ignore[override]
        """The statuses the retry policy retries are the ones worth asking again later."""
        return self.status_code is not None and is_retryable_status(self.status_code)


class BatchNotFoundError(OpenAIBatchAPIError):
    """HTTP 404: no batch with that id is visible to these credentials."""


class OpenAIFileNotFoundError(OpenAIBatchAPIError):
    """HTTP 404 for a file: none with that id is visible to these credentials (never there, deleted or expired)."""


class OpenAIBatchAuthenticationError(OpenAIBatchAPIError):
    """HTTP 401 or 403: the API key is missing, wrong, or lacks access to this organization or project."""


class OpenAIBatchRateLimitError(OpenAIBatchAPIError):
    """Rate limiting (HTTP 429, or 503 with a retry hint) still answered after every retry: backpressure, which a
    wait rides out until its deadline rather than counting it as a failed poll."""


class OpenAIBatchGatewayError(OpenAIBatchAPIError):
    """A proxy or CDN answered instead of the API: an error page (a 403 challenge, say) with no OpenAI error
    envelope. It says nothing about the credentials or the batch, so it is transient."""

    transient = True  # type: ignore[assignment]


class BatchNotCancellableError(OpenAIBatchAPIError):
    """The batch already reached a state that cannot be cancelled (HTTP 409, or 400 on some deployments).

    :param batch_status: the batch's status as reported by the API's message, e.g. ``"completed"``.
    """

    def __init__(self, message: str, *, batch_status: str | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.batch_status = batch_status


class OpenAIBatchConnectionError(OpenAIBatchError):
    """No usable HTTP response arrived: connection refused or dropped, or a timeout, after every retry."""

    transient = True


class OpenAIBatchResponseError(OpenAIBatchError):
    """The API's answers cannot be used: a 2xx body that is not a valid Batch object (invalid JSON, an HTML
    page...), a body that cannot be decoded, a list whose cursor does not advance, or a batch whose status
    contradicts the API's refusal to cancel it.

    Treated as transient: it is almost always a proxy or load balancer hiccup, and the next poll succeeds.
    """

    transient = True


class OpenAIBatchPollingError(OpenAIBatchError):
    """A polling round of the status board broke for a reason of its own, not the API's (a bug: please report
    it, with the triggerer's log). Transient: the next round polls again, and a wait gives up only after several
    in a row."""

    transient = True


class OpenAIFileDownloadError(OpenAIBatchError):
    """A file's content did not arrive whole: the connection was lost in the middle of it, or the bytes received
    do not add up to the file's size (``File.bytes``).

    Transient when the download was cut short (asking again from the start may get it whole), not when more bytes
    arrived than the file has (the content is not the file the API describes).

    :param expected_bytes: the file's size, when the check against it failed; ``None`` for a lost connection.
    :param received_bytes: the bytes received before the download stopped.
    """

    def __init__(
        self, message: str, *, file_id: str, received_bytes: int, expected_bytes: int | None = None
    ) -> None:
        super().__init__(message, file_id=file_id)
        self.expected_bytes = expected_bytes
        self.received_bytes = received_bytes

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return self.expected_bytes is None or self.received_bytes < self.expected_bytes
