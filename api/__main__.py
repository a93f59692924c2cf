"""Serve the API with uvicorn: `python -m api`."""

import uvicorn

from api.http import capped_http_protocol
from shared.settings import api_settings


def main() -> None:
    settings = api_settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        http=capped_http_protocol(settings.max_header_bytes),
    )


if __name__ == "__main__":
    main()
