"""The transparency ledger as members see it: receipts they verify offline, a checkpoint each one keeps and only
moves forward with a consistency proof, and a rewritten history that those checkpoints catch.

The coordinator side is the real SQLite ledger (coordinator.ledger.store, WAL, synchronous=FULL) with checkpoints
signed by the MID's log key; the member side is protocol code only (protocol.checkpoint, protocol.witness), so a
member needs nothing from the coordinator but bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from coordinator.ledger.audit import audit_ledger
from coordinator.ledger.store import LedgerStore
from demo.checks import Outcomes, reason_of
from demo.reports import tampered
from protocol.checkpoint import AddCheckpointBody, parse_receipt, verify_receipt
from protocol.errors import ProtocolError, Reason
from protocol.identity import SignerKey, VerifierKey
from protocol.leaves import Leaf, LeafKind, decode_leaf
from protocol.note import NoteSignature
from protocol.witness import CosignaturePolicy, Cosigner, LogView, Witness


@dataclass
class MemberLedgerView:
    """One household's own copy of what it was promised: receipts for its reports and its trusted checkpoint."""

    name: str
    view: LogView
    receipts: list[tuple[str, bytes]] = field(default_factory=list)

    def take_receipt(self, receipt: str, leaf: bytes, prove_consistency: LedgerStore) -> int:
        """Verify a receipt offline, then move the trusted checkpoint to the receipt's, demanding a consistency
        proof from the log. Returns the new trusted size."""
        verified = verify_receipt(receipt, leaf, self.view.log_vkey)
        note = parse_receipt(receipt).checkpoint_note
        old, new = self.view.checkpoint.size, verified.checkpoint.checkpoint.size
        if new > old:
            self.view.update(note, prove_consistency.consistency_proof(old, new))
        self.receipts.append((receipt, leaf))
        return self.view.checkpoint.size

    def witness_latest(self, store: LedgerStore, cosigner: Cosigner, now_s: int) -> NoteSignature:
        """As a tlog-witness: accept the log's latest checkpoint only with a proof that it extends the trusted one,
        then cosign it."""
        old = self.view.checkpoint.size
        body = AddCheckpointBody(old, tuple(store.consistency_proof(old, store.size)), store.checkpoint())
        return Witness(self.view, cosigner).add_checkpoint(body.encode(), now_s)

    def save_checkpoint(self, folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        path = folder / f"{self.name}.checkpoint"
        assert self.view.note is not None
        path.write_bytes(self.view.note)
        return path


def log_reports(store: LedgerStore, envelopes: dict[str, bytes]) -> dict[str, tuple[int, bytes]]:
    """Append the round's verified envelopes verbatim as contribution leaves, in one durable batch."""
    leaves = {name: Leaf(LeafKind.CONTRIBUTION, envelope).encode() for name, envelope in envelopes.items()}
    if not leaves:
        return {}
    appended = store.append(list(leaves.values()))
    return {name: (index, leaf) for (name, leaf), index in zip(leaves.items(), appended.indices, strict=True)}


def show_rewritten_history_caught(
    store: LedgerStore,
    log_key: SignerKey,
    member: MemberLedgerView,
    attack_dir: Path,
    outcomes: Outcomes,
    console: Console,
) -> None:
    """The MID holds its key, so it can sign a whole rewritten history; only checkpoints held outside the log (the
    members') catch it. Builds such a fork next to the real ledger and lets `member` and the audit look at it."""
    trusted = member.view.checkpoint.size
    vkey: VerifierKey = member.view.log_vkey
    leaves = [data for _, data in store.leaves(0, store.size)]
    # Rewrite one household report inside the member's trusted prefix, keep everything else, re-sign.
    victim = next(i for i, data in enumerate(leaves[:trusted]) if decode_leaf(data).kind is LeafKind.CONTRIBUTION)
    forged = Leaf(LeafKind.CONTRIBUTION, tampered(decode_leaf(leaves[victim]).signed)).encode()
    attack_dir.mkdir(exist_ok=True)
    fork_path = attack_dir / "rewritten-ledger.db"
    fork_path.unlink(missing_ok=True)
    with LedgerStore.open(fork_path, log_key) as fork:
        fork.append([*leaves[:victim], forged, *leaves[victim + 1 : trusted]])
        same_size_note = fork.checkpoint()
        fork.append([*leaves[trusted:], b"one more leaf, so the fork is also longer"])
        longer_note, longer_proof = fork.checkpoint(), fork.consistency_proof(trusted, fork.size)
    console.print(f"   the MID re-signs a history with leaf {victim} rewritten: {fork_path}")

    got, detail = reason_of(lambda: member.view.update(same_size_note, []))
    outcomes.expect(f"{member.name} shown the fork's checkpoint at its own size {trusted}", Reason.EQUIVOCATION, got)
    outcomes.expect("both signed checkpoints kept as evidence", 1, len(member.view.evidence))
    got, detail = reason_of(lambda: member.view.update(longer_note, longer_proof))
    outcomes.expect(f"{member.name} shown the longer fork with its consistency proof", Reason.ROOT_MISMATCH, got)
    outcomes.expect(f"{member.name} still trusts size", trusted, member.view.checkpoint.size)
    got, _ = reason_of(lambda: audit_ledger(fork_path, vkey))
    outcomes.expect(
        "file-only audit of the fork (self-consistent, so it passes: why members keep checkpoints)", "accepted", got
    )
    got, detail = reason_of(lambda: audit_ledger(fork_path, vkey, [member.view.note or b""]))
    outcomes.expect(f"audit of the fork with {member.name}'s checkpoint", Reason.INCONSISTENT, got)
    console.print(f"   audit says: {detail}", highlight=False)


def witness_and_cosign(
    store: LedgerStore,
    members: dict[str, MemberLedgerView],
    witness_keys: dict[str, SignerKey],
    quorum: int,
    outcomes: Outcomes,
) -> CosignaturePolicy:
    """Every member witnesses the latest checkpoint and cosigns it; the log attaches the cosignatures, so every
    receipt served from now on carries them, and a member's k-of-n policy can require them."""
    cosigners = {name: Cosigner(witness_keys[name]) for name in members}
    cosignatures: list[NoteSignature] = []
    for name, member in members.items():
        try:
            cosignatures.append(member.witness_latest(store, cosigners[name], int(time.time())))
            got = "accepted"
        except ProtocolError as exc:
            got = str(exc.reason)
        outcomes.expect(f"{name} checks consistency to size {store.size} and cosigns", "accepted", got)
    verifiers = [c.verifier for c in cosigners.values()]
    store.attach_cosignatures(store.size, cosignatures, verifiers)
    policy = CosignaturePolicy(tuple(verifiers), quorum)
    log_vkey = next(iter(members.values())).view.log_vkey
    got, _ = reason_of(lambda: policy.check(store.checkpoint(), log_vkey))
    outcomes.expect(f"latest checkpoint carries {quorum} of {len(verifiers)} witness cosignatures", "accepted", got)
    earlier = store.checkpoint_sizes()[0]  # the end of round 1: nobody cosigned it
    got, _ = reason_of(lambda: policy.check(store.checkpoint(earlier), log_vkey))
    outcomes.expect(f"checkpoint at size {earlier}, which no member cosigned", Reason.QUORUM_NOT_MET, got)
    return policy
