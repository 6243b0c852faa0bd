"""Test-wide set-up: enough file descriptors for the thousand-connection tests."""

from __future__ import annotations

import resource

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < min(hard, 65536):
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
