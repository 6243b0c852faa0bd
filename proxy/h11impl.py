"""The h11 the proxy speaks HTTP/1.1 with: `h11_mypyc` when installed, else `h11`.

h11-mypyc (the pip extra `fast`) is a fork of h11 compiled with mypyc: the same parser, the same
validation and the same events, installed under its own import name so that it sits beside
h11 rather than replacing it. Every module of ours that handles HTTP imports `h11` from here, so
one process never mixes the two (an `h11.Request` is not an `h11_mypyc.Request`). Type checking
always sees h11, whose API the fork keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import h11 as h11
else:
    try:
        import h11_mypyc as h11
    except ImportError:
        import h11

__all__ = ["h11"]
