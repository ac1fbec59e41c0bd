"""The concurrency controller, against simulated servers: time is simulated, so these tests
say what the policy does, free of this machine's noise. tests/test_adaptive.py runs it for real."""
import bisect
import heapq
import random

import pytest

from pmap.concurrency import Adaptive, ConcurrencyController


def simulate(latency_of, seconds, bounds=Adaptive(), error_of=None, seed=1, cpu_per_item=None):
    """Run the controller against a server model for `seconds` of simulated time. Items are
    started whenever fewer than `limit` are in flight; `latency_of(in_flight, rng)` gives an
    item's latency when it starts; `cpu_per_item`, the CPU each reports (None: not measured).
    Returns (controller, [(time, limit)] per item start)."""
    rng = random.Random(seed)
    now = 0.0
    controller = ConcurrencyController(bounds, now)
    in_flight = []  # heap of (finish time, start time, failed)
    in_flight_starts = []  # the same items' start times, sorted (time only moves on)
    starts = []
    while now < seconds:
        while len(in_flight) < controller.limit:
            latency = latency_of(len(in_flight) + 1, rng)
            failed = bool(error_of and error_of(len(in_flight) + 1, rng))
            heapq.heappush(in_flight, (now + latency, now, failed))
            in_flight_starts.append(now)
            starts.append((now, controller.limit))
        now, started, failed = heapq.heappop(in_flight)
        del in_flight_starts[bisect.bisect_left(in_flight_starts, started)]
        controller.record(1, now - started, errors=int(failed), started=started, cpu=cpu_per_item)
        controller.update(now, stragglers=count_stragglers(controller, in_flight_starts, now),
                          oldest_started=in_flight_starts[0] if in_flight_starts else None)
    return controller, starts


def count_stragglers(controller, sorted_starts, now):
    """How many of these start times `controller.is_straggler` holds for, found by bisection:
    a scan of every item in flight at every step took most of this file's time. It holds on
    those started since `lowered_at` that have run longer than a bound, a run of the sorted
    starts from the first of them on."""
    first = bisect.bisect_left(sorted_starts, controller.lowered_at)
    low, high = first, len(sorted_starts)
    while low < high:  # the first start from `first` on that is not a straggler
        middle = (low + high) // 2
        if controller.is_straggler(sorted_starts[middle], 1, now):
            low = middle + 1
        else:
            high = middle
    return low - first


def settled_limits(controller, share=0.5):
    points = controller.trajectory
    return [limit for _, limit, _ in points[int(len(points) * (1 - share)):]]


def test_unlimited_waits_reach_high_concurrency_within_a_few_hundred_milliseconds():
    controller, starts = simulate(lambda n, rng: 0.015 * rng.uniform(0.95, 1.05), seconds=1.0)
    reached = next(t for t, limit in starts if limit >= 128)
    assert reached < 0.4
    assert min(settled_limits(controller)) >= 128


def test_a_server_of_fixed_capacity_settles_near_its_capacity():
    capacity, service = 16, 0.02

    def shared(n, rng):  # processor sharing: past the capacity, every item slows down
        return service * max(1.0, n / capacity) * rng.uniform(0.95, 1.05)

    controller, _ = simulate(shared, seconds=20.0)
    limits = settled_limits(controller)
    assert capacity / 2 <= min(limits) and max(limits) <= 2 * capacity, controller.trajectory[-20:]


def test_past_a_small_accept_queue_the_syn_retry_drives_the_limit_back():
    backlog = 6

    def accept_queue(n, rng):  # a connection beyond the backlog waits for a SYN retry (1 s)
        overflow = max(0, n - backlog) / n
        return 0.02 + (1.0 if rng.random() < overflow else 0.0)

    controller, _ = simulate(accept_queue, seconds=30.0)
    limits = settled_limits(controller)
    assert max(limits) <= 2 * backlog, controller.trajectory[-20:]
    assert min(limits) >= 1


def test_a_gil_bound_client_holds_where_its_cpu_saturates_the_gil():
    wait, cpu = 0.02, 0.0005  # one core runs 2000 items/s: 40 in flight keep it busy

    def gil_shared(n, rng):  # past that, items queue for the GIL: latency grows, throughput not
        return max(wait + cpu, n * cpu) * rng.uniform(0.95, 1.05)

    measured, _ = simulate(gil_shared, seconds=5.0, cpu_per_item=cpu)
    blind, _ = simulate(gil_shared, seconds=5.0)
    saturating = wait / cpu
    assert max(limit for _, limit, _ in measured.trajectory) <= 1.5 * saturating, measured.trajectory[:10]
    assert min(settled_limits(measured)) >= saturating / 2, measured.trajectory[-10:]
    # without the CPU it climbs on until latency doubles, well past the point of any gain
    assert max(limit for _, limit, _ in blind.trajectory) > 2 * saturating
    # and it has no more threads started ahead than the bound can use
    assert measured.useful is not None and measured.workers_wanted <= max(measured.limit, measured.useful)
    assert blind.useful is None


def test_threads_are_wanted_ahead_of_a_rise_while_growing():
    controller = ConcurrencyController(Adaptive(start=16, maximum=256), 0.0)
    assert controller.workers_wanted == 64  # the next rise's limit: its threads start early
    controller.growing = False
    assert controller.workers_wanted == controller.limit


def test_a_rise_is_judged_once_its_burst_has_ended():
    # every item of a burst ends in one latency: no task is left that could straggle, so slow
    # start need not wait the 2.2 latencies in which a queueing task would show
    latency = 0.025
    controller, starts = simulate(lambda n, rng: latency, seconds=0.3, bounds=Adaptive(start=64))
    first_rise = next(t for t, limit in starts if limit > 64)
    assert first_rise <= 1.5 * latency


def test_connection_errors_halve_the_limit_and_it_never_leaves_its_bounds():
    bounds = Adaptive(start=8, minimum=2, maximum=40)
    controller, starts = simulate(lambda n, rng: 0.01, seconds=3.0, bounds=bounds,
                                  error_of=lambda n, rng: n > 10 and rng.random() < 0.5)
    assert all(bounds.minimum <= limit <= bounds.maximum for _, limit in starts)
    assert max(settled_limits(controller)) <= 20
    # before any error it grew, so the cut came from the errors, not from a lack of gain
    assert max(limit for _, limit in starts) > 10


def closed_sample(controller, now, items, latency, stragglers=0):
    """`items` items of `latency` each finished by `now`, one sample; the limit after it."""
    for _ in range(items):
        controller.record(1, latency, started=now - latency)
    before = len(controller.trajectory)
    limit = controller.update(now, stragglers=stragglers)
    assert len(controller.trajectory) == before + 1, "the sample should have closed"
    return limit


def grown_once(start=16, latency=0.02):
    """A controller whose first sample (`start` items at `latency`) was clean: it rose x4."""
    controller = ConcurrencyController(Adaptive(start=start, maximum=256), 0.0)
    assert closed_sample(controller, 0.05, start, latency) == 4 * start
    return controller


def test_a_rise_into_queueing_falls_back_halfway_not_to_where_it_started():
    controller = grown_once(start=16)
    # at 64 the items queued (2.5 x the floor): the best count lies between 16 and 64
    assert closed_sample(controller, 0.17, 64, 0.05) == 32
    assert not controller.growing


def test_a_rise_after_which_tasks_straggle_with_flat_latency_goes_back_to_the_last_good_limit():
    controller = grown_once(start=12)
    # a quarter of the 48 tasks wait for a SYN retry while those that finish took the floor
    assert closed_sample(controller, 0.10, 40, 0.021, stragglers=12) == 12
    assert not controller.growing


def test_a_rise_after_which_tasks_straggle_and_finished_ones_queued_falls_back_halfway():
    controller = grown_once(start=16)
    assert closed_sample(controller, 0.17, 40, 0.05, stragglers=20) == 32
    assert not controller.growing


def test_a_slow_sample_at_the_maximum_while_growing_keeps_the_limit():
    # a busy machine slows 256 sleeping threads past twice the floor; holding judges that next
    controller = ConcurrencyController(Adaptive(start=64, maximum=256), 0.0)
    assert closed_sample(controller, 0.05, 64, 0.02) == 256
    assert closed_sample(controller, 0.10, 256, 0.021) == 256
    assert closed_sample(controller, 0.25, 256, 0.05) == 256
    assert not controller.growing


def test_the_trajectory_stays_bounded():
    # 10 ms items: about 2,300 points noted in the minute, past the cap several times over
    controller, _ = simulate(lambda n, rng: 0.01, seconds=60.0, bounds=Adaptive(maximum=8))
    assert 0 < len(controller.trajectory) <= 500
    times = [t for t, _, _ in controller.trajectory]
    assert times == sorted(times) and times[-1] > 30


@pytest.mark.parametrize("kwargs", [dict(start=0), dict(minimum=5, start=4), dict(maximum=2, start=4),
                                    dict(start=True), dict(maximum=2.5)])
def test_bad_bounds_are_refused(kwargs):
    with pytest.raises(ValueError, match="Adaptive"):
        Adaptive(**kwargs)
