"""A BaiSpawner in the test's own process (kubespawner's ``_mock`` way: no hub around it).

JupyterHub's own objects (an in-memory hub database with the user and its server
record, ``User``, ``Hub``) are real; what the hub would do around a spawn
(proxy, readiness checks, its API) is left out, so ``start``, ``progress``,
``poll``, ``stop`` and the state can be driven and watched directly.
"""
from __future__ import annotations

from jupyterhub import orm
from jupyterhub.objects import Hub
from jupyterhub.user import User

from bai_spawner.spawner import BaiSpawner


def make_spawner(user: str = "alice", server: str = "work", **config) -> BaiSpawner:
    db = orm.new_session_factory("sqlite:///:memory:")()
    orm_user = orm.User(name=user)
    db.add(orm_user)
    db.commit()
    hub_user = User(orm_user, {})
    hub_user._new_orm_spawner(server, server)
    config.setdefault("hub", Hub())
    config.setdefault("oauth_client_id", "test-client")
    config.setdefault("api_token", "test-token")
    return hub_user._new_spawner(server, spawner_class=BaiSpawner, **config)
