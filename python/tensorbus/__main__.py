"""The ``tensorbus`` command (``python -m tensorbus``, or the console script the wheel installs).

The command-line tool is built into the native module, so the wheel alone gives every subcommand
(``up``, ``agent``, ``command-node``, ``status``, ``ctl``, ``demo``, ``bench``, ``doctor``,
``plan``). Processes it starts (agents, workers) run ``python -m tensorbus`` again.
``TENSORBUS_BIN`` names a separately built binary to run instead.
"""

import json
import os
import signal
import sys


def main() -> None:
    exe = os.environ.get("TENSORBUS_BIN")
    if exe:
        os.execv(exe, [exe, *sys.argv[1:]])
    os.environ.setdefault("TENSORBUS_SELF", json.dumps([sys.executable, "-m", "tensorbus"]))
    # The tool handles SIGINT/SIGTERM itself where it must stop in order (up, agents); elsewhere
    # Ctrl-C ends it at once, as for any command-line program.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from . import _native

    sys.exit(_native.cli(["tensorbus", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
