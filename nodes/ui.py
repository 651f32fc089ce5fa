"""What the nodes tell the browser while sampling (web/js reads these events): one ``hyperalign.step`` per
hypernetwork call, one ``hyperalign.run`` per sampler call. Sent only when a ComfyUI server runs in this
process; the UI is optional, so a failed send never fails a run."""

from __future__ import annotations

import logging
import sys

from ..hyperalign.runtime import AlignRun, HypernetCall
from .settings import AlignSettings

logger = logging.getLogger(__name__)

STEP_EVENT = "hyperalign.step"
RUN_EVENT = "hyperalign.run"


def call_dict(call: HypernetCall) -> dict:
    stats = call.stats or {}
    return {
        "step": call.step,
        "progress": call.progress,
        "seconds": call.seconds,
        "norm": stats.get("norm", 0.0),
        "cosine": stats.get("cosine", 1.0),
        "relative_change": stats.get("relative_change", 0.0),
    }


def send(event: str, payload: dict) -> None:
    """Send to the browser when a ComfyUI server runs in this process (never in headless use)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    try:
        instance.send_sync(event, payload)
    except Exception:  # the UI is optional: never fail a sampling run over it
        logger.warning("HyperAlign: could not send %r to the UI", event, exc_info=True)


def send_step(settings: AlignSettings, call: HypernetCall) -> None:
    send(STEP_EVENT, {"node": settings.node_id, "call": call_dict(call)})


def send_run(settings: AlignSettings, align: AlignRun, steps: int, summary: str) -> None:
    send(
        RUN_EVENT,
        {
            "node": settings.node_id,
            "mode": settings.mode,
            "steps": steps,
            "keysteps": list(settings.keysteps),
            "seconds": sum(call.seconds for call in align.calls),
            "summary": summary,
            "calls": [call_dict(call) for call in align.calls],
        },
    )
