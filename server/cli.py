"""The `kiln` command. Subcommands: `serve` (more, like `build`, `plan` and `profiles`, come later).

Bad input ends with one readable sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from server import __version__

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`).\n")


def _add_serve(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API. Every flag can also be set with the "
        "environment variable KILN_<FLAG> (e.g. KILN_PORT=9000); flags win.",
        argument_default=argparse.SUPPRESS,  # unset flags fall through to KILN_* variables and defaults
    )
    add = serve.add_argument
    add("--model", help="Hugging Face model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    add("--engine-dir", help="engine directory to serve (for now: a Hugging Face model folder)")
    add("--served-model-name", help="model name clients send and /v1/models lists (default: the model's name)")
    add("--host", help="address to bind (default: 0.0.0.0)")
    add("--port", help="port to bind (default: 8000)")
    add("--api-key", help="require 'Authorization: Bearer <key>' on /v1 (health and metrics stay open)")
    add("--max-model-len", help="context length (default: the model's, capped by the KV cache)")
    add("--max-num-seqs", help="most sequences in a batch (default: 64)")
    add("--max-num-batched-tokens", help="token budget of one engine step (default: 2048)")
    add("--max-num-waiting", help="most requests waiting for a batch slot; more get HTTP 429 (default: 1024)")
    add("--kv-cache-memory", help="memory for the KV cache, e.g. 2GiB or 512MiB (default: 1 GiB on CPU)")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, help="reuse KV blocks of shared prompt prefixes (default: on)")
    add("--dtype", help="auto, float32, bfloat16 or float16 (default: auto)")
    add("--block-size", help="tokens per KV-cache block, a power of two (default: 16)")
    add("--device", help="auto, cpu or cuda (default: auto)")
    add("--graceful-shutdown-timeout", help="seconds in-flight requests get to finish after SIGTERM (default: 30)")
    add("--log-level", help="critical, error, warning, info or debug (default: info)")
    serve.set_defaults(handler=serve_command)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kiln", description="kiln: an OpenAI-compatible LLM inference microservice.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    _add_serve(subparsers)
    return parser


def settings_error_sentence(exc: ValidationError) -> str:
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    if not error["loc"]:
        return f"{message}."
    field = str(error["loc"][0])
    return f"invalid --{field.replace('_', '-')} (KILN_{field.upper()}) {error['input']!r}: {message}."


def serve_command(args: argparse.Namespace) -> int:
    from server.settings import ServerSettings

    overrides = {key: value for key, value in vars(args).items() if key != "handler"}
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        print(f"kiln serve: {settings_error_sentence(exc)}", file=sys.stderr)
        return EXIT_USAGE

    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server: uvicorn.Server | None = None

    def stop_on_failure() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_engine_failure=stop_on_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.graceful_shutdown_timeout,
    )
    server = uvicorn.Server(config)
    server.run()
    if app.state.engine_holder.error is not None:
        return 1
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
