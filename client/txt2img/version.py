"""The installed client's version."""

from importlib.metadata import version

__version__ = version("txt2img-client")
