"""The scheduler's durable state on PostgreSQL, including the database going away."""
import pytest

from bai_scheduler.store import StoreUnavailable
from helpers.postgres import Postgres
from test_service import ONE_FGPU, held, key, make

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg():
    server = Postgres().start()
    yield server
    server.destroy()


async def test_seed_scenario_and_restart_on_postgresql(pg):
    url = pg.create_db("bai_seed")
    svc = make(url)
    recs = [await svc.submit(key(i), ONE_FGPU) for i in range(3)]
    again = make(url)
    assert {r.key: r.state for r in again.records.values()} == {
        key(0): "RUNNING", key(1): "RUNNING", key(2): "PENDING"}
    await again.release(recs[0].id)
    assert make(url).get(key(2)).state == "RUNNING"


async def test_database_outage_fails_cleanly_and_recovers(pg):
    url = pg.create_db("bai_outage")
    svc = make(url)
    first = await svc.submit(key(0), ONE_FGPU)
    await svc.submit(key(1), ONE_FGPU)
    await svc.submit(key(2), ONE_FGPU)
    before = ({r.key: r.state for r in svc.records.values()}, held(svc))
    pg.stop()
    pg.wait_down()
    try:
        with pytest.raises(StoreUnavailable):
            await svc.submit(key(3), ONE_FGPU)
        with pytest.raises(StoreUnavailable):
            await svc.release(first.id)
        # Nothing changed in memory either: no share was freed or granted.
        assert ({r.key: r.state for r in svc.records.values()}, held(svc)) == before
        assert svc.degraded
    finally:
        pg.start()
    freed = await svc.release(first.id)
    assert [r.key for r in freed] == [key(2)]
    assert svc.degraded is None
    assert make(url).get(key(2)).state == "RUNNING"
