"""The agent's version, read from the installed distribution."""

from importlib import metadata

try:
    VERSION = metadata.version("headwater")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+source"

USER_AGENT = f"headwater/{VERSION}"
