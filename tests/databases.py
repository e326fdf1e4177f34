"""A real PostgreSQL for the tests that need one.

The project machine runs PostgreSQL on 127.0.0.1:5432 with trust auth. Elsewhere the tests
skip with a message saying how to point them at one; in CI (``CI`` set) a missing server fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text

PG_ADMIN_URL = os.environ.get(
    "PACS_AI_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def postgres_database() -> Iterator[str]:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"pacs_ai_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        if os.environ.get("CI"):
            raise AssertionError(f"PostgreSQL is required in CI and unreachable: {exc}") from exc
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL} ({type(exc).__name__}); set PACS_AI_TEST_PG")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
