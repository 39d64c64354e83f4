"""The MID's signing key: it signs checkpoints, receipts, invites, grants and refusals, and names the log's origin."""

from __future__ import annotations

from pathlib import Path

from protocol.errors import InviteInvalidError
from protocol.identity import SignerKey, load_signer_key, save_signer_key


def mid_key_name(mid: str) -> str:
    """The MID key's name, which is also its log's checkpoint origin (protocol.checkpoint)."""
    return f"midgate/{mid}"


def load_or_create_mid_key(path: Path, mid: str) -> SignerKey:
    if path.exists():
        key = load_signer_key(path)
        if key.name != mid_key_name(mid):
            raise InviteInvalidError("MID key file belongs to another MID", expected=mid_key_name(mid), found=key.name)
        return key
    key = SignerKey.generate(mid_key_name(mid))
    save_signer_key(path, key)
    return key
