"""jaxpaged's log lines go to stderr at INFO by default, as vLLM's do; JAXPAGED_LOG_LEVEL
changes the level. Orbax's absl INFO chatter is kept out."""

import logging
import os


def configure() -> None:
    root = logging.getLogger("jaxpaged")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s] %(message)s",
                                               "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("JAXPAGED_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)
