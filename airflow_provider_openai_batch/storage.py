"""Where downloads go: a local path or an Airflow ``ObjectStoragePath``, checked before any request is sent.

A destination is given as a local path (a string without a scheme, or a ``PathLike``) or as object storage (an
``ObjectStoragePath``, or a URL string such as ``s3://bucket/prefix``, which becomes one). Local paths stay
``pathlib.Path``: no fsspec layer between the download and the disk. Both kinds offer the same ``open``,
``rename``, ``mkdir`` and ``/``, so everything downstream handles them alike.

Mistakes are reported with the parameter named, before the first API request (``TypeError`` for a value of the
wrong type, ``ValueError`` otherwise): a relative local path (a task runs in a temporary working directory), a
file in the way of a directory, an unwritable directory, or a URL scheme for which Airflow has no filesystem
(install the provider that adds it, or ``attach()`` one).

``ObjectStoragePath`` is imported only when a destination is resolved, so that importing an operator (every DAG
file parse) and a trigger (the triggerer) never pays for it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeAlias, TypeVar

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    Target: TypeAlias = Path | ObjectStoragePath

T = TypeVar("T")


def directory(value: Any, name: str) -> Target:
    """``value`` as a directory to write into (created when first written to), or ``ValueError`` naming ``name``."""
    target, local = _target(value, name)
    if local is not None and local.exists() and not local.is_dir():
        raise ValueError(f"{name} {str(value)!r} is a file, not a directory.")
    return target


def file(value: Any, name: str) -> Target:
    """``value`` as a file to write (its directory created if missing), or ``ValueError`` naming ``name``."""
    target, local = _target(value, name)
    if str(value).endswith(("/", os.sep)) or (local is not None and local.is_dir()):
        raise ValueError(f"{name} {str(value)!r} is a directory; give the path of the file to write.")
    return target


def write_via_temporary(target: Target, write: Callable[[IO[bytes]], T]) -> T:
    """Run ``write`` on a temporary file next to ``target``, then rename it to ``target``.

    Readers never see a partial file under the final name: on any failure the temporary file is removed, and if the
    process dies first it is left as a hidden ``.<name>.<random>.partial``. An older ``target`` is replaced only by
    a complete new one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        with temporary.open("wb") as out:
            result = write(out)
        temporary.rename(target)  # type: ignore[arg-type]  # both sides are the same kind of path
    except BaseException:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    return result


class Staging:
    """Files written under hidden names, that take their own names together once every one of them is complete.

    Through :func:`all_or_nothing`: a failure while any of them is written (a download lost, a line that cannot
    be read) leaves none of them under its name, rather than, say, an ``output.jsonl`` without the
    ``remaining.jsonl`` that tells what did not run.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Target, Target]] = []

    def stage(self, target: Target) -> Target:
        """The hidden name under which to write ``target`` until :meth:`commit`."""
        staged = target.with_name(f".{target.name}.{secrets.token_hex(4)}.staged")
        self._staged.append((staged, target))
        return staged

    def commit(self) -> None:
        """Give every staged file its name; if one rename fails, take back those done and remove the rest."""
        done: list[Target] = []
        try:
            for staged, target in self._staged:
                staged.rename(target)  # type: ignore[arg-type]  # both sides are the same kind of path
                done.append(target)
        except BaseException:
            for target in done:
                with suppress(OSError):
                    target.unlink(missing_ok=True)
            self.discard()
            raise

    def discard(self) -> None:
        for staged, _ in self._staged:
            with suppress(OSError):
                staged.unlink(missing_ok=True)


@contextmanager
def all_or_nothing() -> Iterator[Staging]:
    """A :class:`Staging` committed when the block ends, and discarded if it raises."""
    staging = Staging()
    try:
        yield staging
    except BaseException:
        staging.discard()
        raise
    staging.commit()


def _target(value: Any, name: str) -> tuple[Target, Path | None]:
    """The destination ``value`` names, and its local path if it is on this machine's disk."""
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    if isinstance(value, str | os.PathLike) and "\x00" in str(value):
        raise ValueError(f"{name} {str(value)!r:.80} holds a NUL character: no file name can.")
    if isinstance(value, ObjectStoragePath) or (isinstance(value, str) and "://" in value):
        return _object_storage(value, name)
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{name} is an empty string; give a local directory, a URL or an ObjectStoragePath.")
    if not isinstance(value, str | os.PathLike):
        raise TypeError(
            f"{name} must be a local path, a URL string or an ObjectStoragePath, got {type(value).__name__}: "
            f"{value!r:.80}."
        )
    local = _local(Path(value), str(value), name)
    return local, local


def _object_storage(value: Any, name: str) -> tuple[ObjectStoragePath, Path | None]:
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    if isinstance(value, str):
        _check_url(value, name)
    try:
        path = value if isinstance(value, ObjectStoragePath) else ObjectStoragePath(value)
        path.fs  # noqa: B018 - resolves Airflow's filesystem for the scheme: fails now if there is none
    except (ValueError, ImportError) as error:
        raise ValueError(
            f"{name} {str(value)!r}: Airflow has no filesystem for it ({error}). Install the provider that adds "
            "the scheme (e.g. apache-airflow-providers-amazon for s3://), or attach() an fsspec filesystem."
        ) from None
    local = _local(Path(path.path), str(value), name) if path.protocol in ("file", "local") else None
    return path, local


def _check_url(url: str, name: str) -> None:
    """Refuse what ``ObjectStoragePath`` would quietly resolve against the working directory: a URL without a
    scheme (``://x``), or a local one with a relative path (``file://rel/x`` is ``rel/x``, not ``/rel/x``)."""
    scheme, _, path = url.partition("://")
    if not scheme:
        raise ValueError(f"{name} {url!r:.80} has no scheme before '://'; give e.g. 's3://bucket/prefix'.")
    if scheme.lower() in ("file", "local") and not path.startswith("/"):
        raise ValueError(
            f"{name} {url!r:.80} is a relative path; give an absolute one, as in 'file:///data/results' "
            "(a task runs in a temporary directory)."
        )


def _local(path: Path, shown: str, name: str) -> Path:
    if not path.is_absolute():
        raise ValueError(
            f"{name} {shown!r} is a relative path; give an absolute one (a task runs in a temporary directory)."
        )
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if existing != path and not existing.is_dir():
        raise ValueError(f"{name} {shown!r} cannot be created: {str(existing)!r} is a file, not a directory.")
    writable = existing if existing.is_dir() else existing.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name} {shown!r} cannot be written: {str(writable)!r} is not writable by this worker."
        )
    return path
