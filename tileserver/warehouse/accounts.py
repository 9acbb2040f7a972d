"""Users, datastores (each with its community) and bearer tokens, kept in the publication store.

A datastore is the unit of access: a user sees a datastore's entities when they are a member of
its community (one community per datastore, as on the platform).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tileserver.publication.store import (
    Conflict,
    Connection,
    IntegrityError,
    InvalidRecord,
    NotFound,
    PublicationStore,
)

from .credentials import TOKEN_LIFETIME, hash_password, new_token, token_hash, verify_password

DEFAULT_DATASTORE = "default"
DEFAULT_QUOTA = 10 << 30  # bytes of uploads and pyramids per datastore
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Datastore:
    id: str
    name: str
    technical_name: str
    quota: int
    created_at: str


@dataclass(frozen=True)
class User:
    id: str
    login: str
    first_name: str
    last_name: str
    email: str
    created_at: str
    datastores: tuple[str, ...]  # ids of the datastores whose community the user belongs to


class Accounts:
    def __init__(self, store: PublicationStore) -> None:
        self.store = store

    # --- datastores ---------------------------------------------------------------------------

    @staticmethod
    def _datastore(row: tuple) -> Datastore:
        return Datastore(*row)

    _DATASTORES = "SELECT id, name, technical_name, quota, created_at FROM wh_datastores"

    def list_datastores(self) -> list[Datastore]:
        with self.store.reading() as db:
            return [self._datastore(r) for r in db.execute(self._DATASTORES + " ORDER BY name")]

    def get_datastore(self, ident: str) -> Datastore | None:
        """By id, or by name / technical name (so `datastore=default` works in a client's settings)."""
        with self.store.reading() as db:
            row = db.execute(self._DATASTORES + " WHERE id = ? OR name = ? OR technical_name = ?",
                             (ident.lower() if _is_uuid(ident) else ident, ident, ident)).fetchone()
        return None if row is None else self._datastore(row)

    def default_datastore(self) -> Datastore:
        datastore = self.get_datastore(DEFAULT_DATASTORE)
        if datastore is None:  # renamed or removed: the oldest one owns records nobody claimed
            with self.store.reading() as db:
                datastore = self._datastore(db.execute(self._DATASTORES + " ORDER BY created_at LIMIT 1").fetchone())
        return datastore

    def add_datastore(self, name: str, technical_name: str | None = None, quota: int = DEFAULT_QUOTA) -> Datastore:
        technical_name = technical_name or name
        for value, field in ((name, "name"), (technical_name, "technical_name")):
            if not isinstance(value, str) or not _NAME.match(value):
                raise InvalidRecord("must be 1–100 letters, digits, '_', '-' or '.'", field)
        if quota < 0:
            raise InvalidRecord("must not be negative", "quota")
        datastore = Datastore(str(uuid.uuid4()), name, technical_name, quota, now_iso())
        try:
            with self.store.transaction(publish=False) as db:
                db.execute("INSERT INTO wh_datastores (id, name, technical_name, quota, created_at)"
                           " VALUES (?, ?, ?, ?, ?)", (datastore.id, name, technical_name, quota, datastore.created_at))
        except IntegrityError:
            raise Conflict(f"a datastore named {name} already exists", "name") from None
        return datastore

    # --- users --------------------------------------------------------------------------------

    _USERS = "SELECT id, login, first_name, last_name, email, created_at FROM wh_users"

    def _user(self, db: Connection, row: tuple[str, str, str, str, str, str]) -> User:
        datastores = tuple(r[0] for r in db.execute(
            "SELECT datastore_id FROM wh_members WHERE user_id = ? ORDER BY datastore_id", (row[0],)))
        return User(*row, datastores=datastores)

    def list_users(self) -> list[User]:
        with self.store.reading() as db:
            return [self._user(db, r) for r in db.execute(self._USERS + " ORDER BY login").fetchall()]

    def get_user(self, user_id: str) -> User | None:
        with self.store.reading() as db:
            row = db.execute(self._USERS + " WHERE id = ?", (user_id,)).fetchone()
            return None if row is None else self._user(db, row)

    def add_user(self, login: str, password: str, first_name: str = "", last_name: str = "", email: str = "",
                 datastores: tuple[str, ...] = (DEFAULT_DATASTORE,)) -> User:
        if not isinstance(login, str) or not login.strip() or len(login) > 200:
            raise InvalidRecord("must be a non-empty string of at most 200 characters", "login")
        if not isinstance(password, str) or len(password) < 1:
            raise InvalidRecord("must not be empty", "password")
        members = []
        for ident in datastores:
            datastore = self.get_datastore(ident)
            if datastore is None:
                raise NotFound(f"no datastore {ident}", "datastore")
            members.append(datastore.id)
        user_id = str(uuid.uuid4())
        # the SDK puts last_name into entity names (<last_name>__pyramide): keep it identifier-safe
        last_name = last_name or re.sub(r"[^A-Za-z0-9_]", "_", login)
        password_hash = hash_password(password)
        try:
            with self.store.transaction(publish=False) as db:
                db.execute("INSERT INTO wh_users (id, login, password_hash, first_name, last_name, email, created_at)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (user_id, login, password_hash, first_name, last_name, email, now_iso()))
                db.executemany("INSERT INTO wh_members (user_id, datastore_id) VALUES (?, ?)",
                               [(user_id, d) for d in dict.fromkeys(members)])
        except IntegrityError:
            raise Conflict(f"a user {login} already exists", "login") from None
        user = self.get_user(user_id)
        assert user is not None
        return user

    def remove_user(self, login: str) -> None:
        """The user goes, and their API keys are revoked with them (a new catalog revision)."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE revoked_at IS NULL AND id IN (SELECT o.key_id"
                " FROM wh_key_owners o JOIN wh_users u ON u.id = o.user_id WHERE u.login = ?)",
                (now_iso(), login),
            )
            if not db.execute("DELETE FROM wh_users WHERE login = ?", (login,)).rowcount:
                raise NotFound(f"no user {login}", "login")

    def join(self, login: str, datastore: str) -> None:
        """The user joins a datastore's community (by name or id): a new catalog revision, since what
        their keys open follows their memberships (their grants there went when they left)."""
        with self._membership(login, datastore) as (db, user_id, found):
            if db.execute("SELECT 1 FROM wh_members WHERE user_id = ? AND datastore_id = ?",
                          (user_id, found.id)).fetchone() is None:
                db.execute("INSERT INTO wh_members (user_id, datastore_id) VALUES (?, ?)", (user_id, found.id))

    @contextlib.contextmanager
    def _membership(self, login: str, datastore: str) -> Iterator[tuple[Any, str, Datastore]]:
        """A write transaction with the user's id and the datastore (by name or id), both known."""
        found = self.get_datastore(datastore)
        if found is None:
            raise NotFound(f"no datastore {datastore}", "datastore")
        with self.store.transaction() as db:
            row = db.execute("SELECT id FROM wh_users WHERE login = ?", (login,)).fetchone()
            if row is None:
                raise NotFound(f"no user {login}", "login")
            yield db, row[0], found

    def leave(self, login: str, datastore: str) -> None:
        """The user leaves a datastore's community (by name or id): the grants their keys hold on
        that datastore's offerings go with the membership, so rejoining later reopens nothing; one
        write, a new catalog revision (the keys stop opening those layers at once)."""
        with self._membership(login, datastore) as (db, user_id, found):
            if not db.execute("DELETE FROM wh_members WHERE user_id = ? AND datastore_id = ?",
                              (user_id, found.id)).rowcount:
                raise NotFound(f"user {login} is not a member of datastore {found.name}", "datastore")
            theirs = {r[0] for r in db.execute("SELECT id FROM wh_entities WHERE kind = 'offering'"
                                               " AND datastore_id = ?", (found.id,))}
            for key_id, text in db.execute("SELECT key_id, body FROM wh_key_owners WHERE user_id = ?",
                                           (user_id,)).fetchall():
                body = json.loads(text)
                kept = [o for o in body.get("offerings", []) if o not in theirs]
                if kept != body.get("offerings", []):
                    db.execute("UPDATE wh_key_owners SET body = ? WHERE key_id = ?",
                               (json.dumps({**body, "offerings": kept}), key_id))

    def authenticate(self, login: str, password: str) -> User | None:
        """The user whose login and password match; slow on purpose (scrypt), run it in a thread."""
        with self.store.reading() as db:
            row = db.execute("SELECT id, password_hash FROM wh_users WHERE login = ?", (login,)).fetchone()
        if row is None:
            verify_password(password, _timing_hash())  # same cost whether the login exists or not
            return None
        return self.get_user(row[0]) if verify_password(password, row[1]) else None

    # --- tokens -------------------------------------------------------------------------------

    def issue_token(self, user_id: str, lifetime: int = TOKEN_LIFETIME) -> str:
        token = new_token()
        now = time.time()
        with self.store.transaction(publish=False) as db:
            db.execute("DELETE FROM wh_tokens WHERE expires_at < ?", (now,))
            db.execute("INSERT INTO wh_tokens (token_hash, user_id, expires_at) VALUES (?, ?, ?)",
                       (token_hash(token), user_id, now + lifetime))
        return token

    def user_for_token(self, token: str) -> User | None:
        with self.store.reading() as db:
            row = db.execute("SELECT user_id FROM wh_tokens WHERE token_hash = ? AND expires_at > ?",
                             (token_hash(token), time.time())).fetchone()
        return None if row is None else self.get_user(row[0])


@functools.cache
def _timing_hash() -> str:
    """A hash to verify against for unknown logins (computed once: one scrypt per attempt, not two)."""
    return hash_password("timing")


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
