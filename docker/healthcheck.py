#!/usr/bin/env python3
"""The images' HEALTHCHECK: GET /health on the port the server listens on; exit status 0 when it answers 200.

The port is the one the entrypoint wrote to $REMIX_PORT_FILE (from `--port N`, `--port=N` or REMIX_PORT), else
REMIX_PORT, else remix-serve's default 8000. The probe goes to 127.0.0.1, where the default --host 0.0.0.0 listens.
"""

import os
import sys
import urllib.request


def port() -> str:
    path = os.environ.get("REMIX_PORT_FILE")
    if path:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass  # the entrypoint has not run (another command) or could not write the file
    return os.environ.get("REMIX_PORT") or "8000"


if __name__ == "__main__":
    url = f"http://127.0.0.1:{port()}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            sys.exit(0 if response.status == 200 else 1)
    except OSError as e:
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        sys.exit(1)
