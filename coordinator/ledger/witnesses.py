"""Members' agents as the log's witnesses: the coordinator's side of C2SP tlog-cosignature.

Each running agent cosigns, with its device key, a checkpoint it has checked against its own trusted one
(edge/agent/witnessing.py) and posts the cosigned note (`POST /v1/cosignature`). `WitnessDesk` verifies each
cosignature against the keys of the MID's enrolled, unrevoked devices (`witnesses()`), attaches it to the stored
checkpoint (`LedgerStore.attach_cosignatures`) and knows the latest checkpoint a quorum has cosigned: the one members'
statements and receipts are verified against.

Quorum: a majority of the witnesses, at most `quorum_max` (`[witnesses] quorum_max`, default 3), so a small MID
needs most of its devices and a large one a few, whatever share of them is online.

Convergence: agents cosign what `candidate()` names, the largest checkpoint some witness has cosigned that is not yet
witnessed (else the latest), so agents polling at different moments under steady traffic still cosign one size.
Blocking (SQLite, signature checks): call from a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coordinator.ledger.store import LedgerStore
from protocol.checkpoint import parse_checkpoint_text
from protocol.errors import BadNoteError, InconsistentError, MalformedError, QuorumNotMetError, TooLargeError
from protocol.note import parse_note
from protocol.witness import CosignaturePolicy, CosignatureVerifier, verify_cosignature

MAX_COSIGNATURE_BODY = 16 * 1024
MAX_COSIGNATURES = 32
"""Cosignature lines kept per checkpoint: checkpoints travel in receipts (at most 32 KiB) and notes hold 100 lines."""
_RECOVERY_SCAN = 4096


def quorum_of(witnesses: int, quorum_max: int) -> int:
    """A majority of `witnesses`, at most `quorum_max` (at least 1)."""
    return max(1, min(quorum_max, witnesses // 2 + 1))


@dataclass(frozen=True)
class CosignatureAccepted:
    size: int
    cosignatures: int
    witnessed: bool


class WitnessDesk:
    def __init__(
        self, ledger: LedgerStore, witnesses: Callable[[], Sequence[CosignatureVerifier]], quorum_max: int
    ) -> None:
        self.ledger = ledger
        self._witnesses = witnesses
        self.quorum_max = quorum_max
        self._lock = threading.Lock()
        self._witnessed: int | None = None
        self._candidate: int | None = None
        self._recover()

    def policy(self) -> CosignaturePolicy | None:
        """The k-of-n policy over the current witnesses; None while the MID has no device."""
        witnesses = tuple(self._witnesses())
        if not witnesses:
            return None
        return CosignaturePolicy(witnesses, quorum_of(len(witnesses), self.quorum_max))

    def accept(self, body: bytes) -> CosignatureAccepted:
        """Attach the cosignatures of a cosigned checkpoint note; raises a ProtocolError and stores nothing if the note
        is not the checkpoint the log signed at its size, or a line is not a valid cosignature by a witness."""
        if len(body) > MAX_COSIGNATURE_BODY:
            raise TooLargeError("cosigned checkpoint too large", limit=MAX_COSIGNATURE_BODY, found=len(body))
        note = parse_note(body)
        checkpoint = parse_checkpoint_text(note.text)
        if checkpoint.origin != self.ledger.origin:
            raise BadNoteError("checkpoint of another log", expected=self.ledger.origin, found=checkpoint.origin)
        if checkpoint.size == 0:
            raise MalformedError("the empty tree is not witnessed")
        log_key = self.ledger.verifier
        lines = [s for s in note.signatures if (s.name, s.key_id) != (log_key.name, log_key.key_id)]
        if not lines:
            raise MalformedError("no cosignature in the note")
        witnesses = tuple(self._witnesses())
        with self._lock:
            stored = parse_note(self.ledger.checkpoint(checkpoint.size))
            if stored.text != note.text:
                raise InconsistentError("not the checkpoint the log signed at this size", size=checkpoint.size)
            for line in lines:
                verify_cosignature(note.text, line, witnesses)
            present = {(s.name, s.key_id) for s in stored.signatures}
            room = MAX_COSIGNATURES - (len(present) - 1)
            new = [s for s in lines if (s.name, s.key_id) not in present][: max(room, 0)]
            updated = self.ledger.attach_cosignatures(checkpoint.size, new, witnesses) if new else stored.encode()
            witnessed = self._is_witnessed(updated, self.policy())
            if witnessed and (self._witnessed is None or checkpoint.size > self._witnessed):
                self._witnessed = checkpoint.size
            if not witnessed and (self._candidate is None or checkpoint.size > self._candidate):
                self._candidate = checkpoint.size
        return CosignatureAccepted(checkpoint.size, len(parse_note(updated).signatures) - 1, witnessed)

    def witnessed(self) -> bytes:
        """The latest checkpoint a quorum of the current witnesses cosigned; QuorumNotMetError if none is."""
        with self._lock:
            size = self._witnessed
            if size is not None and not self._is_witnessed(self.ledger.checkpoint(size), self.policy()):
                # The witness set changed (a device revoked): look again.
                self._recover()
                size = self._witnessed
            if size is None:
                raise QuorumNotMetError("no checkpoint is witnessed yet", quorum_max=self.quorum_max)
            return self.ledger.checkpoint(size)

    def candidate(self) -> bytes:
        """The checkpoint witnesses should cosign now: the largest one some witness cosigned and a quorum has not yet
        (so that agents polling at different times meet on one), else the latest."""
        with self._lock:
            size = self._candidate
            if size is not None and (self._witnessed is None or size > self._witnessed):
                return self.ledger.checkpoint(size)
        if self.ledger.size == 0:
            raise MalformedError("the log is empty: nothing to witness")
        return self.ledger.checkpoint()

    def _is_witnessed(self, note: bytes, policy: CosignaturePolicy | None) -> bool:
        if policy is None:
            return False
        try:
            policy.check(note, self.ledger.verifier)
        except QuorumNotMetError:
            return False
        return True

    def _recover(self) -> None:
        """After a start (or a change of witnesses): find the latest witnessed checkpoint and the candidate among the
        most recent checkpoints."""
        self._witnessed = self._candidate = None
        policy = self.policy()
        for size in reversed(self.ledger.checkpoint_sizes()[-_RECOVERY_SCAN:]):
            note = self.ledger.checkpoint(size)
            if len(parse_note(note).signatures) < 2:
                continue
            if self._is_witnessed(note, policy):
                self._witnessed = size
                return
            if self._candidate is None:
                self._candidate = size
