"""Reject command-line overrides that name no key of the bundle's configs (a typo would otherwise be ignored)."""

from __future__ import annotations

import ast
import difflib
import sys
from collections.abc import Sequence

from monai.bundle import ConfigParser

from medcl.errors import MedclInputError, install_excepthook

__all__ = ["check_cli_overrides"]

# arguments of `monai.bundle run` itself, and the keys `--tracking mlflow` may be given
RUN_ARGS = {"config_file", "meta_file", "logging_file", "tracking", "args_file", "run_id", "init_id", "final_id"}
TRACKING_KEYS = {"output_dir", "tracking_uri", "experiment_name", "run_name", "save_execute_config"}


def _cli_keys(argv: Sequence[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


def _config_files(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        value = (
            argv[i + 1]
            if arg == "--config_file" and i + 1 < len(argv)
            else arg.split("=", 1)[1]
            if arg.startswith("--config_file=")
            else None
        )
        if value is not None:
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
            return [parsed] if isinstance(parsed, str) else [str(p) for p in parsed]
    return []


def _new_argument(parser: ConfigParser, key: str) -> bool:
    """``parent#name`` where ``parent`` is a component (``_target_``): a new keyword argument of it, which its
    constructor checks when the component is built (a misspelt one fails there)."""
    parent = key.rsplit("#", 1)[0] if "#" in key else None
    return parent is not None and parent in parser and isinstance(parser[parent], dict) and "_target_" in parser[parent]


def check_cli_overrides(argv: Sequence[str] | None = None) -> bool:
    """Check that every ``--key value`` of a ``python -m monai.bundle run`` command names a key of its configs.

    Does nothing when the process was not started by ``monai.bundle run`` with ``--config_file`` (e.g. MONAI Label
    or a Python caller, which pass overrides programmatically). In a command-line run it also installs
    :func:`medcl.errors.install_excepthook`, so bad input stops the run with its one message, not a traceback.

    Raises:
        MedclInputError: naming the unknown key, the config files, and the closest existing keys.
    """
    from_cli = argv is None
    argv = list(sys.argv if argv is None else argv)
    files = _config_files(argv)
    if "run" not in argv or not files:
        return True
    if from_cli:
        install_excepthook()
    parser = ConfigParser()
    parser.read_config(files)
    allowed = RUN_ARGS | (
        TRACKING_KEYS if "--tracking" in argv or any(a.startswith("--tracking=") for a in argv) else set()
    )
    for key in _cli_keys(argv):
        if key in allowed or key in parser or _new_argument(parser, key):
            continue
        top_level = [k for k in parser.get() if isinstance(k, str)]
        hint = difflib.get_close_matches(key.split("#")[0], top_level, n=3)
        raise MedclInputError(
            f"--{key}: no such key in {', '.join(files)}"
            + (f"; did you mean {', '.join('--' + h for h in hint)}?" if hint else ".")
            + " Check the spelling; nested keys use '#', e.g. --network_def#channels."
        )
    return True
