import threading

from tests.support import wait_until
from worker.reporter import Reporter


def test_the_latest_update_per_key_wins_and_a_failing_one_is_only_counted() -> None:
    reporter = Reporter(max_pending=10)
    written: list[str] = []
    gate = threading.Event()
    reporter.post("gate", lambda: gate.wait(10) and None)
    reporter.start()
    for step in range(5):
        reporter.post("job-a", lambda step=step: written.append(f"a{step}"))
    reporter.post("job-b", lambda: written.append("b"))

    def boom() -> None:
        raise ConnectionError("Redis is away")

    reporter.post("job-c", boom)
    reporter.post("job-d", lambda: written.append("d"))
    gate.set()
    wait_until(lambda: written == ["a4", "b", "d"], 5, "the pending updates to run")
    assert reporter.failures == 1
    reporter.stop()


def test_past_its_bound_the_reporter_drops_the_oldest_update() -> None:
    reporter = Reporter(max_pending=2)
    written: list[str] = []
    for key in ("one", "two", "three"):
        reporter.post(key, lambda key=key: written.append(key))
    reporter.start()
    reporter.stop()
    assert written == ["two", "three"]
