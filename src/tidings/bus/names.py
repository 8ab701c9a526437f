"""Names that every backend derives from an agent's name: NATS durables, Kafka groups and topics.

They live below the backends so that no backend imports another.
"""

from __future__ import annotations

import hashlib
import re

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ILLEGAL_RE = re.compile(r"[^A-Za-z0-9_-]+")


def agent_token(name: str) -> str:
    """A NATS-legal durable name / subject token (and Kafka topic token) for an agent name.

    Names that need cleaning get a short hash so that 'a.b' and 'a_b' stay distinct.
    """
    if _NAME_RE.match(name):
        return name
    cleaned = _ILLEGAL_RE.sub("_", name).strip("_")[:48] or "agent"
    return f"{cleaned}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
