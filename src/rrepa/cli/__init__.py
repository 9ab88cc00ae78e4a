"""The `rrepa` command line: one sub-command per task, each a thin wrapper over the library.

One module per command group, built from the library's public functions; each adds its sub-commands with
`register(sub)`."""

from __future__ import annotations

import argparse
import errno
import os
import sys

# Idle OpenMP threads sleep instead of spinning. Beside two busy processes on 2 cores a spinning thread burns the
# time slices its partner thread needs: the fmnist step went from 0.59 to 2.47 s (4.2x), against 0.75 to 1.29 s
# with PASSIVE, which costs ~13 % on an idle machine (benchmarks/bench_contention.py). Fewer threads do not help:
# 1 thread beside them took 1.8 s. Only effective before torch is imported, hence here, before the command
# modules (which import torch) are; only a default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # importing torch takes seconds, during which Ctrl-C is likely
    # After the OpenMP default above (E402).
    from rrepa.cli import (  # noqa: E402
        classify,
        convert,
        encoder,
        evaluate,
        experiment,
        latents,
        presets,
        probe,
        rehearse,
        sample,
        train,
        vae,
    )
    from rrepa.cli.options import refuse_empty_paths  # noqa: E402
    from rrepa.utils import Interrupted  # noqa: E402
except KeyboardInterrupt:
    print("rrepa: interrupted", file=sys.stderr)
    sys.exit(130)

# In the order of `rrepa --help`.
GROUPS = (presets, convert, train, sample, experiment, classify, probe, evaluate, encoder, vae, latents, rehearse)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rrepa", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def describe_os_error(err: OSError) -> str:
    """An OSError as one line: the path, the system's cause and what to do about it."""
    if err.filename is None or err.strerror is None:
        return str(err)  # our own messages (CheckpointWriteError, FileNotFoundError("... does not exist ..."))
    where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
    fix = {errno.EROFS: "choose a writable location", errno.EACCES: "check its permissions or choose another path",
           errno.EPERM: "check its permissions and attributes (chattr) or choose another path",
           errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
           errno.EFBIG: "the file exceeds a size limit; write elsewhere", errno.ENOENT: "check the path",
           errno.ENOTDIR: "choose an output path outside it"}
    return f"{where}: {err.strerror}" + (f" ({fix[err.errno]})" if err.errno in fix else "")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    try:
        refuse_empty_paths(args)
        args.func(args)
    except Interrupted as err:
        # Saved at a step boundary: one line saying where and how to continue.
        if _is_rank0():
            print(err.message, file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if _is_rank0():
            print(f"rrepa {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, KeyError, OSError) as err:
        # A user error or an I/O failure: one clear line, no traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, OSError):
            msg = describe_os_error(err)
        print(f"rrepa {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
