#!/usr/bin/env python3
"""Container health check: exit 0 when the service in this container answers /readyz with 200."""

import os
import sys
import urllib.request

port = os.environ.get("HFF_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as e:  # URLError and HTTPError (503 while loading) are OSErrors
    print(f"not ready: {e}", file=sys.stderr)
    sys.exit(1)
