"""Snapshot jobs, kept in the scheduler's database (table ``bai_snapshot_jobs``).

A job is written when it is accepted and at every change of state (queued → committing →
pushing → done | failed), so the jobs outlive a restart of the service: ``interrupted`` finds
those a restart cut short, which the ``Snapshots`` manager marks failed after removing what they
had made. How far a push has come (``progress``) is kept in memory only. The same database as
the queue (``c.BaiScheduler.db_url``), its own table.
"""
from __future__ import annotations

import dataclasses
import time

from sqlalchemy import BigInteger, Float, String, Text, delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

ACTIVE = ("queued", "committing", "pushing")


class JobStoreUnavailable(RuntimeError):
    """The database cannot be reached; the job was not recorded."""


@dataclasses.dataclass
class Job:
    id: str
    user: str
    server: str
    tag: str
    ref: str                        # the private image's name, as users see it: bai-private/alice:v1
    reference: str                  # what is pushed: 127.0.0.1:5000/bai-private/alice:v1
    node: str
    container: str
    requested_by: str
    state: str = "queued"           # queued → committing → pushing → done | failed
    reason: str = ""
    image_id: str = ""
    size: int = 0
    source_image: str = ""
    created_at: float = dataclasses.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: str = ""              # "pushed 12.3 of 45.6 MB" (memory only)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["session"] = f"{self.user}/{self.server}" if self.server else self.user
        out["container"] = self.container[:12]
        return out


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "bai_snapshot_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    server: Mapped[str] = mapped_column(String(255))
    tag: Mapped[str] = mapped_column(String(128))
    ref: Mapped[str] = mapped_column(String(512))
    reference: Mapped[str] = mapped_column(String(512))
    node: Mapped[str] = mapped_column(String(255))
    container: Mapped[str] = mapped_column(String(80))
    requested_by: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    image_id: Mapped[str] = mapped_column(String(80), default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    source_image: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


STORED = [f.name for f in dataclasses.fields(Job) if f.name != "progress"]


class JobStore:
    """The jobs table on the scheduler's database ``engine`` (made if missing)."""

    def __init__(self, engine):
        self.engine = engine
        self._guard(lambda: Base.metadata.create_all(engine))

    @staticmethod
    def _guard(fn):
        try:
            return fn()
        except SQLAlchemyError as e:
            raise JobStoreUnavailable(f"database unavailable: {e.__class__.__name__}") from e

    def save(self, job: Job) -> None:
        def _save():
            with Session(self.engine) as s, s.begin():
                s.merge(JobRow(**{k: getattr(job, k) for k in STORED}))

        self._guard(_save)

    def load(self) -> list[Job]:
        """Every job, oldest first."""
        def _load():
            with Session(self.engine) as s:
                rows = s.scalars(select(JobRow).order_by(JobRow.created_at)).all()
                return [Job(**{k: getattr(r, k) for k in STORED}) for r in rows]

        return self._guard(_load)

    def forget(self, ids: list[str]) -> None:
        if ids:
            self._guard(lambda: self._delete(ids))

    def _delete(self, ids):
        with Session(self.engine) as s, s.begin():
            s.execute(delete(JobRow).where(JobRow.id.in_(ids)))
