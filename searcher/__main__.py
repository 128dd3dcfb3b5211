"""`python -m lookalike.searcher --data DIR`: serve the Lookalike Searcher over gRPC until SIGTERM (then snapshot)."""
from __future__ import annotations

import logging
import sqlite3
import sys
from typing import Sequence

from threadpoolctl import threadpool_limits

from lookalike.serving.server import exit_on_signal_while_starting, serve_until_signalled
from lookalike.serving.tracing import configure_logging
from lookalike.searcher.config import SearcherConfig
from lookalike.searcher.server import create_server
from lookalike.searcher.store import StoreUnavailable


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    exit_on_signal_while_starting()
    # The searcher spreads its work over its own probe lanes. OpenBLAS's helper threads busy-wait after
    # each product (an exact scan of a small shard): measured 20-30 ms of CPU per 2 ms search, a core
    # taken from whatever runs beside the searcher (the embedder, on a small node).
    threadpool_limits(1, user_api="blas")
    try:
        config = SearcherConfig.from_args(argv)
        started, port = create_server(config)
    except (StoreUnavailable, OSError, ValueError) as error:
        # What an operator must fix (an unreachable database, a malformed --store, a data folder that is a
        # file, another searcher on it, a bad setting, a port taken): one line, no traceback.
        logging.getLogger("lookalike.searcher").error("cannot start: %s", error)
        return 1
    except sqlite3.Error as error:  # a data folder it may not write, a damaged database file
        logging.getLogger("lookalike.searcher").error("cannot start: the SQLite store in %s: %s", config.data_dir,
                                                      error)
        return 1
    serve_until_signalled(started, config.grace_seconds, f"searcher listening on port {port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
