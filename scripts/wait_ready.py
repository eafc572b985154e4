"""Wait until a URL answers 200 (a server's readiness endpoint); exit 1 after the time limit.

    python3 scripts/wait_ready.py URL [SECONDS]
"""

import sys
import time
import urllib.request


def main() -> int:
    url, limit = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return 0
        except OSError:
            time.sleep(0.25)
    print(f"wait_ready: {url} did not answer within {limit:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
