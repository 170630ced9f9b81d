"""kiln's HTTP server: an OpenAI-compatible API in front of an `engines.base.Engine`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kiln")
except PackageNotFoundError:  # running from a source tree that was never pip-installed
    __version__ = "0.0.0+source"
