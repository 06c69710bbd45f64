"""`python -m pipeline.launch`: torchrun (PyTorch's own elastic launcher, `torch.distributed.run`)
with its rendezvous failures said in one line.

    python -m pipeline.launch --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --rdzv-id JOB -m pipeline.pretrain

Every option is torchrun's, and so is everything after the rendezvous: the workers, their
restarts (`--max-restarts`), their exit status. What changes is how a job that never starts
ends. torchrun prints its agent's traceback (and, for an endpoint it cannot reach, the C++
stack of every retry) and leaves the cause in the last line; here a rendezvous that does not
complete within `join_timeout`, or an endpoint that does not answer within `read_timeout`,
ends with `launch: error: ...` naming the endpoint and the setting, exit status 1.
"""

from __future__ import annotations

import os
import sys

# c10d's C++ store client logs each failed connection try with its stack; the one line below
# says it. Set for this process only (read once, when torch loads): the workers get the user's.
_user_cpp_log_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
from torch.distributed.elastic.rendezvous.api import (  # noqa: E402
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousTimeoutError,
)
from torch.distributed.run import get_args_parser  # noqa: E402
from torch.distributed.run import main as torchrun  # noqa: E402

if _user_cpp_log_level is None:
    del os.environ["TORCH_CPP_LOG_LEVEL"]
else:
    os.environ["TORCH_CPP_LOG_LEVEL"] = _user_cpp_log_level


def _failure(err: RendezvousError, argv: list[str]) -> str:
    """What went wrong with the rendezvous, and what to check, in one line."""
    args = get_args_parser().parse_args(argv)
    conf = dict(item.split("=", 1) for item in args.rdzv_conf.split(",") if "=" in item)
    endpoint = args.rdzv_endpoint or "127.0.0.1:29400"
    if isinstance(err, RendezvousTimeoutError):
        return (f"the rendezvous at {endpoint} did not complete within join_timeout={conf.get('join_timeout', 600)} s: "
                f"not every node joined (check --nnodes on each node, the same --rdzv-id and --rdzv-endpoint, "
                f"and that the other nodes were started)")
    if isinstance(err, RendezvousConnectionError):
        return (f"cannot reach the rendezvous endpoint {endpoint} (read_timeout={conf.get('read_timeout', 60)} s): "
                f"start the node that hosts it first, or check the host, port and firewall")
    if isinstance(err, RendezvousClosedError):  # another node gave up (its join_timeout) and closed it
        return (f"the rendezvous at {endpoint} was closed by a node that gave up waiting "
                f"(check --nnodes on each node and the same --rdzv-id)")
    return f"the rendezvous at {endpoint} failed: {type(err).__name__}: {err}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        torchrun(argv)
    except RendezvousError as err:
        print(f"launch: error: {_failure(err, argv)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
