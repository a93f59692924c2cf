"""diffusers, transformers and the hub client log through the service's handlers (JSON lines
included) instead of their own, and draw no progress bars."""

import huggingface_hub.utils
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging


def route_library_logs() -> None:
    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
