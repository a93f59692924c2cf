"""Watches the GPU executor: while it is healthy the worker renews its leases and reports itself
alive; once it is dead or hung the worker leaves the live set and exits, so whatever supervises
the process restarts it and the reaper gives its jobs to other workers."""

import logging
import os
import threading
from collections.abc import Callable

from redis.exceptions import RedisError

from worker.executor import GpuExecutor
from worker.heartbeat import Heartbeat
from worker.leases import LeaseKeeper
from worker.periodic import Periodic

log = logging.getLogger(__name__)

# The exit status of a worker whose executor died or hung.
EXIT_EXECUTOR_FAILED = 70


class Supervisor:
    def __init__(
        self,
        executor: GpuExecutor,
        leases: LeaseKeeper,
        heartbeat: Heartbeat,
        interval_s: float,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self._executor = executor
        self._leases = leases
        self._heartbeat = heartbeat
        self._exit = exit_process
        self._live = True
        self._live_lock = threading.Lock()
        self._ticks = Periodic("supervisor", interval_s, self._tick)

    def start(self) -> None:
        self._ticks.start()

    def leave(self) -> None:
        """Stop reporting this worker alive (it is stopping); leases are still renewed."""
        with self._live_lock:
            self._live = False
            self._heartbeat.leave()

    def stop(self) -> None:
        self.leave()
        self._ticks.stop()

    def _tick(self) -> None:
        if not self._executor.healthy():
            log.critical("the GPU executor is dead or hung; this worker exits to be restarted")
            self._heartbeat.leave()
            logging.shutdown()
            self._exit(EXIT_EXECUTOR_FAILED)
            return
        try:
            self._leases.renew()
        except RedisError as exc:
            log.warning("could not renew leases: %s", exc)
        with self._live_lock:
            if self._live:
                self._heartbeat.beat()
