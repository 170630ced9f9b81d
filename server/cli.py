"""The `kiln` command: `serve` here, `build`, `profiles` and `plan` from engines/cli.py.

`kiln serve`'s flags are generated from `ServerSettings` (one declaration per setting). Bad input ends with
one readable sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import cast

from pydantic import ValidationError

from engines import cpu_isa
from engines.cli import EXIT_USAGE, UsageParser, add_commands
from server import __version__
from server.settings import ServerSettings


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API. Every flag can also be set with the "
        "environment variable KILN_<FLAG> (e.g. KILN_PORT=9000); flags win.",
        argument_default=argparse.SUPPRESS,  # unset flags fall through to KILN_* variables and defaults
    )
    add_settings_flags(serve)
    serve.set_defaults(handler=serve_command)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServerSettings` field: --flag-name, the field's description as help; a bool becomes
    --flag / --no-flag. Values stay strings: ServerSettings converts and checks them, as it does KILN_*
    variables, so a bad flag and a bad variable get the same sentence (settings_error_sentence)."""
    for name, field in ServerSettings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=field.description)
        else:
            parser.add_argument(flag, help=field.description)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="kiln", description="kiln: an OpenAI-compatible LLM inference microservice.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=UsageParser)
    _add_serve(subparsers)
    add_commands(subparsers)
    return parser


def settings_error_sentence(exc: ValidationError) -> str:
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    if not error["loc"]:
        return f"{message}."
    field = str(error["loc"][0])
    return f"invalid --{field.replace('_', '-')} (KILN_{field.upper()}) {error['input']!r}: {message}."


def serve_command(args: argparse.Namespace) -> int:
    overrides = {key: value for key, value in vars(args).items() if key != "handler"}
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        print(f"kiln serve: {settings_error_sentence(exc)}", file=sys.stderr)
        return EXIT_USAGE

    import uvicorn

    from server.app import create_app
    from server.log_format import configure_logging
    from server.uvicorn_server import KilnServer

    configure_logging(settings.log_level, settings.log_format)
    server: KilnServer | None = None

    def stop_on_failure() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_engine_failure=stop_on_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # no logging config of uvicorn's own: its records go to kiln's handler, so that every line, the
        # access log's included, has one format and its request id
        log_config=None,
        # uvicorn's annotation says int | None, but it only passes the value to asyncio.timeout, which takes a
        # float: the setting's fractions of a second are kept
        timeout_graceful_shutdown=cast(int, settings.graceful_shutdown_timeout),
    )
    server = KilnServer(config, app.state.in_flight, settings.graceful_shutdown_timeout)
    server.run()
    holder = app.state.engine_holder
    if holder.error is not None or holder.died:
        return 1
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:  # every command reads the CPU's flags (kernels, --dtype auto, profiles): a wrong override stops it here
        cpu_isa.check()
    except cpu_isa.CpuIsaError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
