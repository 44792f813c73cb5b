"""The ``deepfeat`` command: one parser, one module per command group, one error helper.

``fit | validate | test | predict`` go to LightningCLI (:mod:`.fit`); every other command is argparse, registered
by its group's module with ``add_cli(subparsers)``: :mod:`.models` (export, embed, evaluate), :mod:`.milvus`
(load, sync, search, collections), :mod:`.recipe` (recipe list/show/run), :mod:`.actions` (dedup, classify,
cluster), :mod:`.quickstart`, :mod:`.layers` and :mod:`.serve`. Handlers parse arguments and call library
functions; a :class:`~deepfeat.finetune.errors.DeepfeatError` becomes one line on stderr and exit code 2
(:func:`.exits.run_guarded`); ``--debug`` shows the trace.

Building the parser imports no heavy package (torch, Lightning, pymilvus, pandas): ``deepfeat --help`` and
``deepfeat recipe list`` answer at once. So the command modules import the library modules that pull those in
inside their handlers, the one place in deepfeat where its own modules are imported in a function.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from deepfeat.recipes.cli.arguments import DeepfeatParser
from deepfeat.recipes.cli.connection import add_connection_args, connect_from_args
from deepfeat.recipes.cli.exits import run_guarded
from deepfeat.recipes.cli.fit import LIGHTNING_COMMANDS
from deepfeat.recipes.cli.fit import run as run_lightning
from deepfeat.recipes.cli.logs import configure_logging, quiet_grpc

__all__ = [
    "COMMAND_MODULES",
    "DEFERRED_COMMANDS",
    "LIGHTNING_COMMANDS",
    "add_connection_args",
    "build_parser",
    "connect_from_args",
    "main",
]

#: Modules that register their commands with ``add_cli(subparsers)``, in the order of ``deepfeat --help``.
COMMAND_MODULES = (
    "deepfeat.recipes.cli.fit",
    "deepfeat.recipes.cli.models",
    "deepfeat.recipes.cli.milvus",
    "deepfeat.recipes.cli.recipe",
    "deepfeat.recipes.cli.actions",
    "deepfeat.recipes.cli.quickstart",
    "deepfeat.recipes.cli.layers",
)
#: Commands whose module is slow to import: listed by name and help, loaded only when the command is run.
DEFERRED_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("deepfeat.recipes.cli.serve",
              "a local web page: search a collection by image, filter, group, compare two collections"),
}

Handler = Callable[[argparse.Namespace], int]


def _add_global_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="-v info (and other packages' messages), -vv debug logging")
    parser.add_argument("--debug", action="store_true", default=default, help="show full stack traces")


def _add_to_every_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``-v`` and ``--debug`` after the command too (``deepfeat search ... -v``), nested actions included."""
    for parser in set(sub.choices.values()):
        if not parser.add_help:  # a LightningCLI or deferred stub: parsed elsewhere
            continue
        _add_global_options(parser, default=argparse.SUPPRESS)
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            if isinstance(action, argparse._SubParsersAction):
                _add_to_every_command(action)


def _register_deferred(sub: argparse._SubParsersAction, command: str | None) -> None:  # type: ignore[type-arg]
    for name, (module_name, help_text) in DEFERRED_COMMANDS.items():
        if command == name:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                continue
            module.add_cli(sub)
            sub.choices[name].set_defaults(uses_milvus=True)
        else:
            sub.add_parser(name, help=help_text, add_help=False)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``deepfeat`` parser; a deferred command's own options are added only when it is ``command``."""
    parser = DeepfeatParser(prog="deepfeat", description="Fine-tune image backbones with metric learning and "
                                                         "serve the embeddings from Milvus.")
    _add_global_options(parser, default=None)
    parser.set_defaults(verbose=0, debug=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_cli(sub)
    _register_deferred(sub, command)
    _add_to_every_command(sub)
    return parser


def _command_of(argv: Sequence[str]) -> tuple[int, str | None]:
    """The position and name of the command: the first argument that is not an option."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return i, arg
    return len(argv), None


def _run_lightning(argv: list[str], at: int) -> int:
    options = argv[:at]
    debug = "--debug" in options
    verbose = sum(len(a) - 1 for a in options if a.startswith("-v") and set(a[1:]) == {"v"})
    verbose += options.count("--verbose")

    def call() -> int:
        configure_logging(verbose, debug=debug, trains=True, show_info=True)
        return run_lightning(argv[at:])

    return run_guarded(call, debug=debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepfeat`` console script; returns the exit code.

    Raises:
        SystemExit: ``--help`` (code 0) or a bad argument (code 2, one line on stderr), as argparse does.
    """
    quiet_grpc()  # before anything imports grpc
    args_list = list(sys.argv[1:] if argv is None else argv)
    at, command = _command_of(args_list)
    if command in LIGHTNING_COMMANDS:
        return _run_lightning(args_list, at)
    parser = build_parser(command)
    args = parser.parse_args(args_list)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 1

    def call() -> int:
        configure_logging(args.verbose, debug=args.debug, trains=getattr(args, "trains", False),
                          milvus=getattr(args, "uses_milvus", False))
        return handler(args)

    return run_guarded(call, debug=args.debug)
