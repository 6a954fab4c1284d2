"""guard assembled in-process (both doors on the test's event loop), on a small policy directory."""

from __future__ import annotations

from pathlib import Path

from guard.app import GuardApp
from guard.settings import Settings
from guard.upstream.client import UpstreamClient


async def start_app(policies: Path, upstream_url: str, **settings) -> GuardApp:
    """A started GuardApp with `default` (passthrough) and `fixed` (a system prompt) policies, on free ports."""
    (policies / "default.yaml").write_text("name: default\n")
    (policies / "fixed.yaml").write_text("name: fixed\nsteps: [{type: system_prompt, content: Be brief.}]\n")
    defaults = {"port": 0, "http_port": 0, "metrics_port": 0, "policies": policies, "poll_seconds": 0.1}
    app = GuardApp(Settings(**{**defaults, **settings}), UpstreamClient([upstream_url]), "fault-model")
    await app.start()
    return app
