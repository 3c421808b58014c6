"""The command-line contract of the eval tools: one JSON object on stdout, or a one-line error and exit code 2."""
from __future__ import annotations

import json
import sys
from typing import Callable


def print_json_result(compute: Callable[[], dict]) -> int:
    """Run an eval tool's body: its result as JSON on stdout (0), or `error: ...` naming the problem on stderr (2)
    for bad input (ValueError) or an unreadable file (OSError)."""
    try:
        result = compute()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
