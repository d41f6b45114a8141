"""Run the CLI in-process, as the console script does (errors included)."""

import io
import sys
from contextlib import redirect_stderr, redirect_stdout

from targetgen.cli import main as cli_main


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["targetgen", *args]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli_main.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()
