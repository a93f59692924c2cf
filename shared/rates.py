"""What queue ETAs come from: the jobs finished lately, the average seconds per job and the live
workers, read in one script."""

from dataclasses import dataclass
from typing import Any

from shared.keys import COMPLETIONS_KEY, STATS_KEY
from shared.queue import WORKERS_KEY
from shared.scripts import load_script

THROUGHPUT_WINDOW_S = 120.0
_RATES = load_script("queue_rates")


@dataclass(frozen=True)
class QueueRates:
    """What queue ETAs come from, read once per request in O(1) Redis reads."""

    # Jobs finished per second lately, and the average seconds per job; None when unknown.
    rate: float | None
    job_s: float | None
    live_workers: int

    def eta_s(self, position: int) -> float | None:
        """Seconds until a job with `position` jobs ahead finishes."""
        if self.rate:
            return round((position + 1) / self.rate, 2)
        if self.job_s is None:
            return None
        return round((position + 1) * self.job_s / max(self.live_workers, 1), 2)

    @classmethod
    def decode(cls, replies: list[Any]) -> "QueueRates":
        """From the replies to what `queue_rate_reads` queued, the last of them."""
        count, first, last, job_s, workers = replies[-1]
        rate = None
        if count >= 2 and first and last:
            span = float(last) - float(first)
            if span > 0:
                rate = (count - 1) / span
        return cls(rate, float(job_s) if job_s is not None else None, int(workers))


def queue_rate_reads(pipe: Any, worker_max_age_s: float) -> None:
    """Queue on `pipe` (sync or async) the one read `QueueRates.decode` takes."""
    keys = (COMPLETIONS_KEY, STATS_KEY, WORKERS_KEY)
    # The script's text each time: a pipeline cannot load it first, and it is short.
    pipe.eval(_RATES, len(keys), *keys, THROUGHPUT_WINDOW_S, worker_max_age_s)
