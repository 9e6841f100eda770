"""The session form's live note: the real placement on a trial copy of the capacity."""
from decimal import Decimal

from bai_scheduler.core.forecast import capacity_note, kept_for_queue, never_fits, sessions_that_fit, trial_capacity
from bai_scheduler.core.model import Placement, Share
from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.units import FgpuUnits

U = FgpuUnits(2, Decimal("0.5"))  # 4 quanta per GPU


def nodes(gpus=1, count=1):
    return simulated_nodes([{"name": f"n{i}", "gpus": gpus, "gpu_memory": "8GiB"} for i in range(count)], U)


def held(*used, node="n0"):
    """Placements holding ``used[i]`` quanta on GPU i of ``node``."""
    return [Placement(node, (Share(f"GPU-sim-{node}-{i}", q),)) for i, q in enumerate(used) if q]


def fit(used, quanta, count, gpus=None, **kw):
    ns = nodes(gpus or len(used))
    return sessions_that_fit(trial_capacity(ns, U, held(*used), **kw), quanta, count)


def test_sessions_that_fit_place_best_fit_and_count_sessions():
    assert fit((0,), 2, 3) == 2       # 2 fGPU cluster, 3 × 1 fGPU: two start
    assert fit((2,), 2, 3) == 1
    assert fit((3, 1), 2, 2) == 1     # 0.5 + 1.5 free: one 1-fGPU session fits
    assert fit((0, 0), 6, 1) == 1     # 1.5 GPU across two empty devices
    assert fit((0, 1), 6, 1) == 1     # whole + half on the other
    assert fit((1, 1), 6, 1) == 0     # no whole GPU free
    assert fit((4,), 0, 5) == 5       # CPU-only sessions
    assert sessions_that_fit(trial_capacity([], U, []), 1, 1) == 0


def test_the_note_follows_the_schedulers_span_rule():
    # Above one GPU, whole-only placement grants only whole GPUs: 1.5 fGPU never fits.
    # The old copy of placement (JavaScript and Python) said it would start at once.
    assert fit((0, 0), 6, 1, span="whole-only") == 0
    assert fit((0, 0), 8, 1, span="whole-only") == 1
    trial = trial_capacity(nodes(2), U, [], span="whole-only")
    never = never_fits(trial, 6)
    level, text = capacity_note(usage(0, 0), U, 6, 1, fit=0, queue_length=0, never=never)
    assert level == "warning" and "only whole GPUs can be granted" in text and "cannot start here" in text


def test_trial_capacity_leaves_the_live_one_alone():
    ns = nodes(1)
    trial = trial_capacity(ns, U, held(1))
    assert sessions_that_fit(trial, 1, 5) == 3
    assert trial_capacity(ns, U, held(1)).free_quanta == 3


def usage(*used, cap=4):
    return [{"name": "local", "devices": [{"capacity_quanta": cap, "used_quanta": u} for u in used]}]


def test_capacity_note_levels():
    level, text = capacity_note(usage(0), U, 2, 1, fit=1, queue_length=0)
    assert level == "success" and "Free now: 2 of 2 fGPU" in text and "start at once" in text
    level, text = capacity_note(usage(0), U, 2, 3, fit=2, queue_length=0)
    assert level == "warning" and "2 of 3 would start at once; 1 would wait" in text
    level, text = capacity_note(usage(4), U, 1, 1, fit=0, queue_length=2)
    assert level == "warning" and "2 requests already waiting" in text and "wait in the queue" in text
    level, text = capacity_note(usage(0), U, 1, 1, fit=1, queue_length=1)
    assert level == "secondary" and "queue policy" in text
    level, text = capacity_note(usage(0), U, 8, 1, fit=0, queue_length=0)
    assert level == "warning" and "more than this hub has" in text
    level, text = capacity_note(usage(3, 0), U, 1, 1, fit=1, queue_length=0)
    assert "Free now: 2.5 of 4 fGPU (largest piece on one GPU: 2)." in text


def test_the_note_does_not_promise_what_the_queue_keeps_for_requests_ahead():
    """Review finding 3: a 2-fGPU head waits for the GPU; a newcomer's 1 fGPU fits in what is free,
    but the queue keeps it for the head, so the note must not say "at once" (it did)."""
    from bai_scheduler.core.model import Request, RequestKey
    from bai_scheduler.core.queue import AdmissionQueue, QueuePolicy

    ns = nodes(1)
    queue = AdmissionQueue(trial_capacity(ns, U, []))
    for name, quanta in (("a1", 1), ("a2", 1), ("head", 4)):
        queue.submit(Request(RequestKey("alice" if name != "head" else "bob", name), quanta))
    queue.release(RequestKey("alice", "a1"))
    held = [p for _, p in queue.admitted().values()]
    assert sessions_that_fit(trial_capacity(ns, U, held), 2, 1) == 1  # free, if nobody waited

    trial = trial_capacity(ns, U, held)
    kept = kept_for_queue(trial, queue.pending(), queue.pin, queue.policy)
    fit = sessions_that_fit(trial, 2, 1, kept)
    level, text = capacity_note(trial.usage(), U, 2, 1, fit, len(queue), kept=bool(kept))
    assert fit == 0 and level == "warning"
    assert "at once" not in text and "kept for the requests ahead" in text, text
    assert queue.submit(Request(RequestKey("carol", "x"), 2)).state == "PENDING"  # what the scheduler does

    # A pinned senior keeps its devices under every head rule.
    pin = (RequestKey("bob", "head"), queue.capacity.reserve(Request(RequestKey("bob", "head"), 4)))
    for head in ("strict", "skip", "backfill"):
        trial = trial_capacity(ns, U, held)
        assert sessions_that_fit(trial, 2, 1, kept_for_queue(trial, [], pin, QueuePolicy(head=head))) == 0


def test_the_note_counts_only_the_pools_the_session_may_go_to():
    """Issue 18: pool a is free, pool b is full. A session limited to pool b (its group's only pool)
    waits; the note said "would start at once" and counted pool a's free fGPU."""
    pooled = simulated_nodes([{"name": "a", "gpus": 1, "gpu_memory": "8GiB", "pool": "a"},
                              {"name": "b", "gpus": 1, "gpu_memory": "8GiB", "pool": "b"}], U)
    full_b = [Placement("b", (Share("GPU-sim-b-0", 4),))]

    def note(quanta, count, pools):
        trial = trial_capacity(pooled, U, full_b)
        usage = trial.usage()  # before the trial placements
        fit = sessions_that_fit(trial, quanta, count, pools=pools)
        never = never_fits(trial, quanta, pools)
        return fit, capacity_note(usage, U, quanta, count, fit, queue_length=0, never=never, pools=pools)

    assert note(2, 1, ()) == (1, ("success", "Free now: 2 of 4 fGPU (largest piece on one GPU: 2). Nobody is "
                                             "waiting. This session would start at once."))
    assert note(2, 1, ("b",)) == (0, ("warning", "Free now in pool b: 0 of 2 fGPU. Nobody is waiting. This "
                                                 "session would wait in the queue until enough fGPU is free; "
                                                 "it starts by itself."))
    assert note(2, 3, ("a",)) == (2, ("warning", "Free now in pool a: 2 of 2 fGPU. Nobody is waiting. 2 of 3 "
                                                 "would start at once; 1 would wait in the queue and start "
                                                 "by themselves."))
    assert note(4, 2, ("a", "b"))[0] == 1
    assert note(5, 1, ("b",))[1] == ("warning", "Free now in pool b: 0 of 2 fGPU. Nobody is waiting. 2.5 fGPU is "
                                                "more than pool b has.")
