"""Route helpers shared by the protocols whose paths are free text (TMS, OGC API)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.routing import Route


def any_path_route(path: str, endpoint: Callable[[Request], Any]) -> Route:
    """A GET route whose `{x:path}` part matches any character: starlette's pattern stops at a
    newline, and such a path would otherwise fall through to a bare 404 outside our error format."""
    route = Route(path, endpoint, methods=["GET"])
    route.path_regex = re.compile(route.path_regex.pattern, re.DOTALL)
    return route
