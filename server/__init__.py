"""kiln's HTTP server: an OpenAI-compatible API in front of an `engines.base.Engine`."""

from engines.version import __version__

__all__ = ["__version__"]
