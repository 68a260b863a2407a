"""Can the Hugging Face hub be reached? Asked before a download, so an offline run fails fast."""

from __future__ import annotations

import os
import socket


def hub_reachable(*, timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or no TCP connection to HF_ENDPOINT's host:443 opens."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False
