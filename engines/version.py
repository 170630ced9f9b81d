"""kiln's version, for the build (engine manifests, build hashes) and the server (/v1/version, `kiln --version`).

It lives under engines/ because the build stamps it into every engine it writes, and engines/ must not import
`server`; `server` re-exports it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kiln")
except PackageNotFoundError:  # running from a source tree that was never pip-installed
    __version__ = "0.0.0+source"
