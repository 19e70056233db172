"""The distributed deployment of system scenario 7: PostgreSQL, the CeleryExecutor with Redis, two triggerers.

The same Airflow processes as ``deployment.py`` (whose harness this extends), as a platform team runs them on
several machines: the metadata DB is Debian's PostgreSQL 15 (``initdb`` into a temporary directory, ``postgres``
run as an unprivileged user when the tests run as root), the broker Debian's ``redis-server`` (nothing saved to
disk), the tasks run in one ``airflow celery worker``, and two triggerers share the triggers. PostgreSQL and
Redis listen on loopback ports and are stopped by their PIDs after every Airflow process.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psycopg2
import psycopg2.extras

from tests.system.deployment import (
    MIGRATE_TIMEOUT,
    NICENESS,
    READY_TIMEOUT,
    Deployment,
    ManagedProcess,
    as_user,
    free_port,
    wait_for,
)

if TYPE_CHECKING:
    from airflow_provider_openai_batch.testing.emulator import BatchAPIEmulator

#: Where Debian's ``postgresql`` package puts the server's programs (``.ci/run`` installs it).
POSTGRES_BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
#: Who runs PostgreSQL when the tests run as root: it refuses to run as root.
POSTGRES_USER = "nobody"
#: Task slots of the one Celery worker.
CELERY_CONCURRENCY = 16
#: The two triggerers' keys in ``Deployment.processes``.
TRIGGERERS = ("triggerer-a", "triggerer-b")


class DistributedDeployment(Deployment):
    """The deployment of ``deployment.py`` on PostgreSQL, with a Celery worker and two triggerers."""

    #: A profile of each blocked trigger loop (support/sitecustomize.py): Airflow's own stalls or a trigger's?
    triggerer_instrumentation: ClassVar[dict[str, str]] = {"SYSTEM_TEST_PROFILE_SLOW_STEPS": "1"}

    def __init__(self, home: Path, emulator: BatchAPIEmulator, api_key: str) -> None:
        self.pg_port, self.redis_port = free_port(), free_port()
        # Not under pytest's temporary directory, which only root may enter.
        self.pg_dir = Path(tempfile.mkdtemp(prefix="system-test-postgres-"))
        self.services: list[ManagedProcess] = []
        super().__init__(home, emulator, api_key)

    @property
    def db_url(self) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.pg_port}/airflow"

    def _backend_environment(self) -> dict[str, str]:
        return {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.db_url}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(CELERY_CONCURRENCY),
        }

    # ------------------------------------------------------------------------------------ lifecycle

    def _start_backends(self) -> None:
        self._start_postgres()
        redis = ManagedProcess(
            "redis-server",
            [
                "redis-server",
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
            ],
            self.env,
            self.process_logs / "redis.log",
        )
        self.services.append(redis.start())
        wait_for(self._redis_answers, timeout=READY_TIMEOUT, what="redis-server to answer")

    def _start_postgres(self) -> None:
        if not POSTGRES_BINARIES:
            raise RuntimeError(
                "PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)."
            )
        binaries = POSTGRES_BINARIES[-1]
        uid = pwd.getpwnam(POSTGRES_USER).pw_uid if os.geteuid() == 0 else None
        if uid is not None:
            os.chown(self.pg_dir, uid, pwd.getpwuid(uid).pw_gid)
        data = self.pg_dir / "data"
        with open(self.process_logs / "postgres-initdb.log", "wb") as log:
            subprocess.run(
                [str(binaries / "initdb"), "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8",
                 "--no-sync"],
                cwd=self.pg_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                timeout=MIGRATE_TIMEOUT, check=True, **as_user(uid),
            )  # fmt: skip
        postgres = ManagedProcess(
            "postgres",
            [
                str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.pg_port),
                "-k", str(self.pg_dir), "-c", "max_connections=300",
                # A throw-away database: durability buys nothing here and costs the small machine's disk.
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ],
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            self.process_logs / "postgres.log",
            user=uid,
            stop_signal=signal.SIGINT,  # "fast" shutdown: ends the sessions still open
        )  # fmt: skip
        self.services.append(postgres.start())
        wait_for(lambda: self._postgres_sql("postgres", "SELECT 1"), timeout=READY_TIMEOUT, what="postgres")
        self._postgres_sql("postgres", "CREATE DATABASE airflow")

    def _postgres_sql(self, database: str, sql: str) -> bool:
        connection = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="airflow", dbname=database)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql)
        finally:
            connection.close()
        return True

    def _redis_answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def _start_workers(self) -> None:
        self._start(
            "celery-worker",
            [
                "celery",
                "worker",
                "--concurrency",
                str(CELERY_CONCURRENCY),
                "--without-gossip",
                "--without-mingle",
            ],
            NICENESS,
        )
        # One after the other, so that TRIGGERERS[i] is the i-th triggerer job in the job table.
        for started, key in enumerate(TRIGGERERS, start=1):
            self.start_triggerer(key)
            wait_for(
                lambda: len(self.query("SELECT id FROM job WHERE job_type = 'TriggererJob'")) == started,  # noqa: B023
                timeout=READY_TIMEOUT,
                what=f"the job of {key}",
            )

    def triggerer_jobs(self) -> dict[str, int]:
        """``{triggerer key: its job id}``, in start order."""
        rows = self.query("SELECT id FROM job WHERE job_type = 'TriggererJob' ORDER BY id")
        return dict(zip(TRIGGERERS, (row["id"] for row in rows), strict=True))

    def kill(self, key: str) -> None:
        """SIGKILL one Airflow process for good: it is not replaced, and its absence is no failure."""
        self.processes.pop(key).kill()

    def _alive_and(self, condition: Any) -> Any:
        for service in self.services:
            service.check_running()
        return super()._alive_and(condition)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for service in reversed(self.services):
                service.stop()
            shutil.rmtree(self.pg_dir, ignore_errors=True)

    # ----------------------------------------------------------------------------------- metadata DB

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """A short read-only query, written with SQLite's ``?`` placeholders as in ``deployment.py``."""
        connection = psycopg2.connect(self.db_url.replace("+psycopg2", ""))
        try:
            connection.set_session(readonly=True, autocommit=True)
            with connection.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
                cursor.execute(sql.replace("?", "%s"), params)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def db_bytes(self) -> bytes:
        """A plain-text ``pg_dump`` of the metadata DB: every table's rows, as a backup would hold them."""
        return subprocess.run(
            [str(POSTGRES_BINARIES[-1] / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "airflow",
             "airflow"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=MIGRATE_TIMEOUT, check=True,
        ).stdout  # fmt: skip
