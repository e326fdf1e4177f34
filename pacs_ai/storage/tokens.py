"""API tokens: created by an admin, shown once, stored as a SHA-256 hash, revoked not deleted.

A token is 256 random bits (``pai_`` + URL-safe base64). Its hash cannot be reversed, so a
salted slow hash (as for passwords) would add nothing but latency to every request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from pacs_ai.errors import TokenError
from pacs_ai.storage.schema import tokens

PREFIX = "pai_"
# last_used_at is a convenience for admins, not an audit: write it at most once a minute so
# that every API call does not become a database write.
_TOUCH_EVERY_S = 60.0


class Role(StrEnum):
    ADMIN = "admin"
    RADIOLOGIST = "radiologist"
    INTEGRATION = "integration"
    WORKER = "worker"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role, and the peer it stands for (STOW-RS)."""

    token_id: int
    name: str
    role: Role
    peer: str = ""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create(engine: Engine, name: str, role: str, now: float, peer: str = "") -> str:
    """Make a token and return it; only its hash is kept, so this is the one chance to see it."""
    try:
        checked = Role(role)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise TokenError(f"unknown role {role!r}; use one of: {roles}") from None
    if not name or len(name) > 64:
        raise TokenError("a token name must be 1 to 64 characters")
    token = PREFIX + secrets.token_urlsafe(32)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(tokens).values(
                    name=name,
                    role=checked.value,
                    token_hash=hash_token(token),
                    peer=peer,
                    created_at=now,
                )
            )
    except IntegrityError:
        raise TokenError(
            f"a token named {name!r} exists already; pick another name or revoke it first"
        ) from None
    return token


def authenticate(engine: Engine, token: str, now: float) -> Principal | None:
    """The principal for ``token``, or None when it is unknown or revoked."""
    if not token.startswith(PREFIX):
        return None
    with engine.connect() as conn:
        row = conn.execute(select(tokens).where(tokens.c.token_hash == hash_token(token))).first()
    if row is None or row.revoked_at is not None:
        return None
    if row.last_used_at is None or now - row.last_used_at > _TOUCH_EVERY_S:
        with engine.begin() as conn:
            conn.execute(update(tokens).where(tokens.c.id == row.id).values(last_used_at=now))
    return Principal(row.id, row.name, Role(row.role), row.peer)


def list_tokens(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(tokens).order_by(tokens.c.id)).all()
    return [
        {
            "id": r.id,
            "name": r.name,
            "role": r.role,
            "peer": r.peer,
            "created_at": r.created_at,
            "last_used_at": r.last_used_at,
            "revoked_at": r.revoked_at,
        }
        for r in rows
    ]


def revoke(engine: Engine, name: str, now: float) -> None:
    """Revoke the token called ``name``; it stays listed, marked revoked."""
    with engine.begin() as conn:
        done = conn.execute(
            update(tokens)
            .where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        ).rowcount
    if not done:
        names = ", ".join(t["name"] for t in list_tokens(engine) if t["revoked_at"] is None)
        raise TokenError(f"no active token named {name!r} (active: {names or 'none'})")
