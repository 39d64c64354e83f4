"""This device as one of its MID log's witnesses (C2SP tlog-cosignature; docs/ledger.md, "Witnesses").

Every `witness_every_s` the daemon asks the MID which checkpoint to cosign (`GET /v1/checkpoint/candidate`), checks
it exactly as it checks a receipt's checkpoint (signed by the MID key; consistent with the trusted checkpoint by a
consistency proof, a larger one becoming the trusted one), and only then cosigns it with its device key and hands the
cosigned note back (`POST /v1/cosignature`). A checkpoint this device could not check is never cosigned, so a
cosignature says: this member's device saw this tree, and it extends everything the device saw before.
"""

from __future__ import annotations

from edge.agent.ledger_client import LedgerClient
from edge.agent.ledger_view import LedgerView
from protocol.checkpoint import open_checkpoint
from protocol.witness import Cosigner


def cosign_candidate(view: LedgerView, client: LedgerClient, cosigner: Cosigner, now_s: int) -> int | None:
    """Cosign the MID's candidate checkpoint once it checked out; returns its size, or None when this witness had
    cosigned it already. Raises a ProtocolError (nothing cosigned) for a checkpoint that does not check out, and
    ProofUnavailableError when the MID could not be asked."""
    note = client.candidate_checkpoint()
    opened = open_checkpoint(note, view.mid_key)
    view.check_checkpoint(opened)
    if cosigner.has_cosigned(note):
        return None
    client.cosign(cosigner.cosigned_note(opened.verified.text, now_s))
    return opened.checkpoint.size
