"""Command line: rankdown compress | eval | bench | generate | inspect | demo.

It parses and prints; the work is the library's. Here: :func:`main`, what a user's mistake, a
full disk, Ctrl-C, SIGTERM and a closed pipe become (one line on stderr, no traceback, an exit
status), and the names the tests and ``python -m rankdown.cli`` reach.

    parser.py    build_parser: the flags, a method's generated from its config dataclass
    compress.py  rankdown compress (and --dry-run, --heal, --cost)
    evaluate.py  rankdown eval           evaluate_gen.py  its --generate and --tasks humaneval
    commands.py  rankdown generate | inspect | demo | bench
    checks.py    what is checked before any work, and the words of the errors
    output.py    table
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Sequence

from rankdown.cli.checks import disk_advice
from rankdown.cli.commands import cmd_bench, cmd_demo, cmd_generate, cmd_inspect
from rankdown.cli.compress import _method_config, _run_settings, cmd_compress
from rankdown.cli.evaluate import cmd_eval
from rankdown.cli.output import table
from rankdown.cli.parser import build_parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from rankdown.arch import UnsupportedModelError
    from rankdown.config import ConfigError
    from rankdown.io import ModelFolderError

    errors: list[type[BaseException]] = [ConfigError, UnsupportedModelError, ModelFolderError, FileNotFoundError,
                                         FileExistsError]
    try:
        from rankdown.calib import CalibrationError

        errors.append(CalibrationError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the same clean-up, one line, no traceback."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _notes(e: BaseException) -> str:
    """What the library added to an error on its way out (a partial run kept to resume from)."""
    return "".join(f"; {n}" for n in getattr(e, "__notes__", ()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only process 0 logs and prints
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level if main_process else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # transformers' own loading/saving bars drown rankdown's tables
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    import signal
    import threading

    handle = threading.current_thread() is threading.main_thread()  # only there can Python handle signals
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if handle else None
    try:
        result = args.func(args)
        if getattr(args, "json", False) and main_process:
            print(json.dumps(result, default=str))
    except BrokenPipeError:  # stdout closed early (`rankdown inspect DIR | head`): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(f"rankdown {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}{_notes(e)}",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if term else signal.SIGINT)
    except _user_errors() as e:
        who = "" if main_process else f" (process {os.environ.get('RANK')})"
        print(f"rankdown {args.command}{who}: error: {e}{_notes(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a full, read-only or unwritable disk: the data is fine, the place is not
        from rankdown.io import as_disk_error

        disk = as_disk_error(e)
        if disk is None:
            raise
        print(f"rankdown {args.command}: error: {disk_advice(args, disk, _notes(e))}", file=sys.stderr)
        return 2
    finally:
        if handle:
            signal.signal(signal.SIGTERM, previous)
        if "torch" in sys.modules:
            from rankdown.distributed import shutdown

            shutdown()
    return 0


__all__ = ["build_parser", "cmd_bench", "cmd_compress", "cmd_demo", "cmd_eval", "cmd_generate", "cmd_inspect", "main",
           "table", "_method_config", "_run_settings"]
