"""`python -m lookalike.embedder --model DIR`: serve the Lookalike Embedder over gRPC until SIGTERM."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from lookalike.embedder.config import EmbedderConfig
from lookalike.embedder.server import create_server
from lookalike.embedder.model import ModelError
from lookalike.serving.server import exit_on_signal_while_starting, serve_until_signalled
from lookalike.serving.tracing import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    exit_on_signal_while_starting()
    try:
        config = EmbedderConfig.from_args(argv)
        started, port = create_server(config)
    except (OSError, ValueError, ModelError) as error:
        # What an operator must fix (no model there, a model that does not match its manifest, a bad setting,
        # a port taken): one line, no traceback.
        logging.getLogger("lookalike.embedder").error("cannot start: %s", error)
        return 1
    serve_until_signalled(started, config.grace_seconds, f"embedder listening on port {port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
