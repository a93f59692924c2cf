"""Progress and cancellation follow the steps the device has finished, not the ones queued."""

from worker.pipeline import FinishedSteps


class DeviceClock:
    """Stands in for a CUDA stream: events complete when the test says the device got there."""

    def __init__(self) -> None:
        self.recorded = 0
        self.finished = 0
        self.waits: list[int] = []

    def event(self) -> "StepEvent":
        return StepEvent(self)


class StepEvent:
    def __init__(self, clock: DeviceClock) -> None:
        self.clock = clock
        self.step = 0

    def record(self) -> None:
        self.clock.recorded += 1
        self.step = self.clock.recorded

    def query(self) -> bool:
        return self.clock.finished >= self.step

    def synchronize(self) -> None:
        # The host blocks until the device reaches this step.
        self.clock.waits.append(self.step)
        self.clock.finished = max(self.clock.finished, self.step)


def test_on_a_cpu_a_launched_step_is_a_finished_step() -> None:
    steps = FinishedSteps(None)
    assert [steps.launched() for _ in range(3)] == [[1], [2], [3]]
    assert steps.rest() == []


def test_a_step_is_reported_only_once_the_device_finished_it() -> None:
    clock = DeviceClock()
    steps = FinishedSteps(clock.event, lag=2)
    assert steps.launched() == []  # step 1 queued, device still busy
    assert steps.launched() == []
    clock.finished = 2  # the device caught up with both
    assert steps.launched() == [1, 2]
    assert clock.waits == [1, 2]  # already done: the waits cost nothing
    assert steps.rest() == [3]


def test_the_host_never_runs_more_than_lag_steps_ahead_of_the_device() -> None:
    clock = DeviceClock()
    steps = FinishedSteps(clock.event, lag=2)
    reported = [steps.launched() for _ in range(5)]
    # Launching step 3 waits for step 1, step 4 for step 2, and so on: each report is a step
    # the device has finished, and a cancel seen there stops the loop within two steps.
    assert reported == [[], [], [1], [2], [3]]
    assert clock.waits == [1, 2, 3]
    assert steps.rest() == [4, 5]
