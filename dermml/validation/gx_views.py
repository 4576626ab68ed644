"""Data Docs views whose jinja templates are compiled once per machine, not once per report.

great-expectations builds a fresh jinja ``Environment`` for every page it renders and compiles
its ~50 templates again each time (about 0.45 s per report, as long as validating thousands of
small images). These views are GE's own, configured through the site builder's documented
``view`` setting, with jinja's ``FileSystemBytecodeCache`` (a private per-user folder in the
temp directory; entries are keyed by template source checksum, so a GE upgrade recompiles).
"""

from __future__ import annotations

from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import FileSystemBytecodeCache

_CACHE: FileSystemBytecodeCache | None = None


def _cache() -> FileSystemBytecodeCache:
    global _CACHE
    if _CACHE is None:
        _CACHE = FileSystemBytecodeCache()
    return _CACHE


class CachedPageView(DefaultJinjaPageView):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = _cache()


class CachedIndexPageView(DefaultJinjaIndexPageView):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = _cache()
