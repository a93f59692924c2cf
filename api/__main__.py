"""Serve the API with uvicorn in `T2I_API_PROCESSES` processes: `python -m api`."""

import logging
import os
import sys
import tempfile

import uvicorn

from api.http import CappedHeadProtocol
from shared.logs import configure_logging, logging_config
from shared.ports import port_taken
from shared.settings import api_settings, log_settings

# prometheus-client's own switch: each process reads it when it first imports the library.
_MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def main() -> int:
    settings, logs = api_settings(), log_settings()
    configure_logging(logs)
    # Before the application starts anything: uvicorn would find out only after its start-up.
    if why := port_taken(settings.host, settings.port):
        logging.getLogger("api").error(
            "cannot serve the API on %s:%d (%s); set T2I_PORT to a free port",
            settings.host,
            settings.port,
            why,
        )
        return 2
    # A fresh directory per start: counts left by an earlier run would be summed in.
    with tempfile.TemporaryDirectory(prefix="t2i-api-metrics-") as metrics_dir:
        os.environ[_MULTIPROCESS_DIR] = metrics_dir
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.processes,
            http=CappedHeadProtocol,
            log_config=logging_config(logs),
            access_log=logs.access_log,
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C before uvicorn took over the signal.
        sys.exit(130)
