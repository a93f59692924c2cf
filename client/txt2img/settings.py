"""Where the API is and which key to send: `T2I_API_URL` and `T2I_API_KEY`."""

from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ClientSettings(BaseSettings):
    """The Python client and the `txt2img` CLI."""

    model_config = SettingsConfigDict(env_prefix="T2I_", extra="ignore", frozen=True)

    api_url: str = DEFAULT_API_URL
    api_key: str | None = None
