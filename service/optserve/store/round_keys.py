"""Key names of sync-mode rounds (engine/rounds.py), beside the session's own keys.

Every name carries the session's hash tag from `keys.session_tag`, so a round's keys share the
session's Redis Cluster slot and the round scripts' multi-key operations stay atomic there.
Tensor names always come last, so a name containing ':' stays unambiguous.
"""

from __future__ import annotations

from .keys import PREFIX, session_tag

#: Pattern matching every session's rounds channel: one subscription per process hears them all.
ROUNDS_PATTERN = f"{PREFIX}:*:rounds"


def round_pointer_key(sid: str) -> str:
    """String: the number of the session's open (or next) round; rounds count from 1."""
    return f"{session_tag(sid)}:round"


def round_key(sid: str, number: int) -> str:
    """Hash of one round: state, push count, deadline, and its outcome once settled."""
    return f"{session_tag(sid)}:r:{number}"


def round_workers_key(sid: str, number: int) -> str:
    """Hash: worker id -> manifest of its push (token and tensor shapes); HSETNX finds repeats."""
    return f"{session_tag(sid)}:r:{number}:w"


def round_lease_key(sid: str, number: int) -> str:
    """Exists while the process applying the round is alive (it refreshes the TTL)."""
    return f"{session_tag(sid)}:r:{number}:lease"


def round_result_key(sid: str, number: int, tensor: str) -> str:
    """Raw little-endian float32 bytes of one param right after the round's step."""
    return f"{session_tag(sid)}:r:{number}:p:{tensor}"


def round_grad_key(sid: str, token: str, tensor: str) -> str:
    """One push's gradient, raw little-endian float32 bytes.

    Named by the push's random token, not by round: the push writes it before it knows which
    round it will join (the round may close in between, and the push then joins the next).
    """
    return f"{session_tag(sid)}:rg:{token}:{tensor}"


def rounds_channel(sid: str) -> str:
    """Pub/sub channel: each settled round of the session publishes its number here."""
    return f"{session_tag(sid)}:rounds"


def sid_of_channel(channel: bytes | str) -> str | None:
    """The session id inside a rounds channel name (between the hash tag's braces)."""
    text = channel.decode() if isinstance(channel, bytes) else channel
    start, end = text.find("{"), text.find("}")
    return text[start + 1 : end] if 0 <= start < end else None
