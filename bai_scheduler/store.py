"""Durable scheduler state: queued and admitted requests, in SQL.

The in-memory ``AdmissionQueue`` decides; this module remembers.  Every change is
written here before it is acknowledged, and on start-up the service rebuilds
the scheduler from these rows (then lets the Docker engine correct them).
SQLite by default, any SQLAlchemy URL (PostgreSQL in production).

One row per spawn attempt.  The calls block: the service runs them in its
database thread, never on the event loop, and every connection has a connect
and a statement timeout so a stuck database fails a change instead of hanging it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .core.model import Placement, Request, RequestKey, Share


class StoreUnavailable(RuntimeError):
    """The database cannot be reached; nothing was changed."""


class Base(DeclarativeBase):
    pass


class RequestRow(Base):
    __tablename__ = "bai_requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    server: Mapped[str] = mapped_column(String(255))
    seq: Mapped[int] = mapped_column(BigInteger)
    quanta: Mapped[int] = mapped_column(Integer)
    cpu_millis: Mapped[int] = mapped_column(Integer, default=0)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    image: Mapped[str] = mapped_column(String(512), default="")
    user_options: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[str] = mapped_column(String(16))
    node: Mapped[str | None] = mapped_column(String(255), nullable=True)
    shares: Mapped[str] = mapped_column(Text, default="[]")
    submitted_at: Mapped[float] = mapped_column(Float)
    admitted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    stop_error: Mapped[str] = mapped_column(Text, default="")
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)
    group_name: Mapped[str] = mapped_column(String(255), default="")
    pools: Mapped[str] = mapped_column(Text, default="")  # comma-separated


# Columns added after the first release, with the SQL default an older table gets.
ADDED_COLUMNS = {"stop_error": ("TEXT", "''"), "delivered": ("BOOLEAN", "FALSE"),
                 "group_name": ("VARCHAR(255)", "''"), "pools": ("TEXT", "''")}


@dataclass
class Record:
    """One spawn attempt as the service tracks it: what was asked and what was granted.

    ``state``: PENDING (queued, holds nothing), RUNNING (admitted: holds its share, its
    container may be starting), STOPPING (holds its share until its container is known gone;
    the service is removing it, ``stop_error`` says why that failed so far).
    """

    id: str
    request: Request
    state: str
    placement: Placement | None = None
    user_options: dict = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)
    admitted_at: float | None = None
    stop_error: str = ""
    delivered: bool = False  # the admission was handed to its spawner: it counts as started
    changed: int = 0  # the service's change counter at this record's last change (not stored)

    @property
    def key(self) -> RequestKey:
        return self.request.key

    @property
    def holds_share(self) -> bool:
        return self.state in ("RUNNING", "STOPPING")


def _to_row(rec: Record) -> RequestRow:
    p = rec.placement
    return RequestRow(
        id=rec.id,
        user=rec.request.key.user,
        server=rec.request.key.server,
        seq=rec.request.seq,
        quanta=rec.request.quanta,
        cpu_millis=rec.request.cpu_millis,
        memory_bytes=rec.request.memory_bytes,
        image=rec.request.image,
        user_options=json.dumps(rec.user_options),
        state=rec.state,
        node=p.node if p else None,
        shares=json.dumps([[s.device_uuid, s.quanta] for s in p.shares]) if p else "[]",
        submitted_at=rec.submitted_at,
        admitted_at=rec.admitted_at,
        stop_error=rec.stop_error,
        delivered=rec.delivered,
        group_name=rec.request.group,
        pools=",".join(rec.request.pools),
    )


def _from_row(row: RequestRow) -> Record:
    request = Request(
        key=RequestKey(row.user, row.server),
        quanta=row.quanta,
        cpu_millis=row.cpu_millis,
        memory_bytes=row.memory_bytes,
        image=row.image,
        seq=row.seq,
        group=row.group_name or "",
        pools=tuple(p for p in (row.pools or "").split(",") if p),
    )
    placement = None
    if row.node is not None:
        placement = Placement(
            node=row.node,
            shares=tuple(Share(u, q) for u, q in json.loads(row.shares)),
            cpu_millis=row.cpu_millis,
            memory_bytes=row.memory_bytes,
        )
    return Record(
        id=row.id,
        request=request,
        state=row.state,
        placement=placement,
        user_options=json.loads(row.user_options or "{}"),
        submitted_at=row.submitted_at,
        admitted_at=row.admitted_at,
        stop_error=row.stop_error or "",
        delivered=bool(row.delivered),
    )


class Store:
    def __init__(self, url: str, timeout: float = 5.0):
        kwargs = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": timeout}  # waits for another writer's lock
        else:
            kwargs["pool_timeout"] = timeout
        if url.startswith("postgresql"):
            ms = int(timeout * 1000)
            kwargs["connect_args"] = {"connect_timeout": max(1, int(timeout)),
                                      "options": f"-c statement_timeout={ms} -c lock_timeout={ms}"}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            # WAL keeps readers from blocking the single writer.
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

        self._guard(self._create)

    def _create(self):
        Base.metadata.create_all(self.engine)
        have = {c["name"] for c in inspect(self.engine).get_columns(RequestRow.__tablename__)}
        with self.engine.begin() as conn:
            for name, (sql_type, default) in ADDED_COLUMNS.items():
                if name not in have:
                    conn.execute(text(f"ALTER TABLE {RequestRow.__tablename__} "
                                      f"ADD COLUMN {name} {sql_type} DEFAULT {default}"))

    def _guard(self, fn):
        try:
            return fn()
        except SQLAlchemyError as e:
            raise StoreUnavailable(f"database unavailable: {e.__class__.__name__}") from e

    def load(self) -> list[Record]:
        def _load():
            with Session(self.engine) as s:
                rows = s.scalars(select(RequestRow).order_by(RequestRow.seq)).all()
                return [_from_row(r) for r in rows]

        return self._guard(_load)

    def apply(self, upserts: list[Record] = (), deletes: list[str] = ()) -> None:
        """Write one change atomically: these records saved, these ids removed."""

        def _apply():
            with Session(self.engine) as s, s.begin():
                if deletes:
                    s.execute(delete(RequestRow).where(RequestRow.id.in_(list(deletes))))
                for rec in upserts:
                    s.merge(_to_row(rec))

        self._guard(_apply)

