"""torchrun for slurm/launch_node.sh: the same launcher and options, but a failed run ends with one
line naming the failed ranks and their exit codes instead of torchrun's ChildFailedError traceback
(and a TERM/INT/HUP/QUIT that stopped it, or a rendezvous that failed, with one line instead of the
SignalException / RendezvousConnectionError traceback).

The trainers print their own error first (a config mistake is one `config error: ...` line); the
traceback would only bury it. Exit code: that of the first rank that exited with an error, else
128 + N for a rank killed by signal N.
"""

from __future__ import annotations

import os
import socket
import sys

# The agent's own C++ store warnings (a page of stack frames when the store goes away) stay out of
# the log; the trainers, which inherit the environment, keep the default level.
_cpp_log_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
from torch.distributed.elastic.multiprocessing import SignalException  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.elastic.rendezvous import RendezvousError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402

if _cpp_log_level is None:
    del os.environ["TORCH_CPP_LOG_LEVEL"]
else:
    os.environ["TORCH_CPP_LOG_LEVEL"] = _cpp_log_level


def summary(err: ChildFailedError) -> tuple[str, int]:
    """One line for a failed worker group, and the exit code to leave with."""
    parts = []
    for rank, failure in sorted(err.failures.items()):
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"killed by {failure.signal_name()}"
        parts.append(f"rank {rank} {how}")
    # the first rank that exited by itself; the others may have been stopped by torchrun (SIGTERM)
    first = min(err.failures.values(), key=lambda f: (f.exitcode <= 0, f.timestamp)).exitcode
    code = first if first > 0 else (128 - first if first < 0 else 1)
    line = f"{socket.gethostname()}: training failed ({', '.join(parts)}); the trainers' own output above says why"
    return line, code


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv`; 0 when every trainer exited 0."""
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        line, code = summary(e)
        print(line, file=sys.stderr, flush=True)
        return code
    except SignalException as e:  # TERM/INT/HUP/QUIT: torchrun has passed it on to the trainers and waited
        print(f"{socket.gethostname()}: torchrun stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except RendezvousError as e:  # e.g. the store of another job on the same port went away
        cause = f"{type(e).__name__}: {e.__cause__ or e}".splitlines()[0]
        print(f"{socket.gethostname()}: rendezvous at {args.rdzv_endpoint} failed ({cause}); if another job "
              "uses that port, set MASTER_PORT", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
