"""Contract-suite fixtures: the private ``redis_server`` lives in ``tests/redis_server.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis_server import redis_server  # noqa: F401  (a session fixture shared with tests/integration)
