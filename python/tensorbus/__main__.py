"""``python -m tensorbus``: forwards to the ``tensorbus`` command-line tool."""

import os
import shutil
import sys


def main() -> None:
    exe = os.environ.get("TENSORBUS_BIN") or shutil.which("tensorbus")
    if not exe:
        sys.exit("tensorbus: the `tensorbus` binary is not on PATH (build it with `cargo build --release` "
                 "or set TENSORBUS_BIN)")
    os.execv(exe, [exe, *sys.argv[1:]])


if __name__ == "__main__":
    main()
