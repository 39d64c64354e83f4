"""Member-side log view (stale, equivocation, size-0 rules), tlog-cosignatures and the k-of-n witness policy."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.ledger.store import LedgerStore
from protocol.checkpoint import AddCheckpointBody, Checkpoint, parse_checkpoint_text, sign_checkpoint
from protocol.errors import (
    BadKeyError,
    BadNoteError,
    BadProofError,
    BadSignatureError,
    EquivocationError,
    InconsistentError,
    MalformedError,
    QuorumNotMetError,
    RootMismatchError,
    StaleCheckpointError,
    UnknownKeyError,
)
from protocol.identity import SignerKey
from protocol.merkle import EMPTY_ROOT
from protocol.note import add_signatures, parse_note
from protocol.witness import (
    CosignaturePolicy,
    CosignatureVerifier,
    Cosigner,
    LogView,
    Witness,
    cosigned_message,
    verify_cosignature,
)

NOW = 1_790_000_000


@pytest.fixture
def log_key() -> SignerKey:
    return SignerKey.generate("mid.example/ledger")


@pytest.fixture
def store(tmp_path: Path, log_key: SignerKey) -> Iterator[LedgerStore]:
    with LedgerStore.open(tmp_path / "ledger.db", log_key) as ledger:
        for batch in range(4):
            ledger.append([f"entry {batch}.{i}".encode() for i in range(batch + 2)])
        yield ledger


def _witnesses(n: int) -> list[Cosigner]:
    return [Cosigner(SignerKey.generate(f"member{i}.mid.example/witness")) for i in range(n)]


def _text(note: bytes) -> str:
    return parse_note(note).text


def test_view_moves_forward_only_with_consistency_proof(store: LedgerStore, log_key: SignerKey) -> None:
    view = LogView(log_key.verifier)
    assert view.checkpoint.size == 0
    sizes = store.checkpoint_sizes()
    view.update(store.checkpoint(sizes[0]), [])  # from size 0: empty proof (C2SP tlog-witness)
    for old, new in itertools.pairwise(sizes):
        view.update(store.checkpoint(new), store.consistency_proof(old, new))
        assert view.checkpoint.size == new
    assert view.note == store.checkpoint()


def test_view_rejects_bad_proof_and_keeps_state(store: LedgerStore, log_key: SignerKey) -> None:
    sizes = store.checkpoint_sizes()
    view = LogView(log_key.verifier, store.checkpoint(sizes[1]))
    proof = store.consistency_proof(sizes[1], sizes[3])
    tampered = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    with pytest.raises(RootMismatchError):
        view.update(store.checkpoint(sizes[3]), tampered)
    with pytest.raises(BadProofError):
        view.update(store.checkpoint(sizes[3]), proof[:-1])
    with pytest.raises(BadProofError):
        view.update(store.checkpoint(sizes[3]), [])
    assert view.checkpoint.size == sizes[1]


def test_view_rejects_smaller_checkpoint(store: LedgerStore, log_key: SignerKey) -> None:
    sizes = store.checkpoint_sizes()
    view = LogView(log_key.verifier, store.checkpoint(sizes[2]))
    with pytest.raises(StaleCheckpointError) as err:
        view.update(store.checkpoint(sizes[1]), [])
    assert err.value.details == {"trusted": sizes[2], "found": sizes[1]}


def test_same_size_other_root_is_kept_as_evidence(store: LedgerStore, log_key: SignerKey) -> None:
    trusted = store.checkpoint()
    view = LogView(log_key.verifier, trusted)
    forged = sign_checkpoint(Checkpoint(log_key.name, store.size, b"\x07" * 32), log_key)
    with pytest.raises(EquivocationError):
        view.update(forged, [])
    assert len(view.evidence) == 1
    assert {view.evidence[0].first, view.evidence[0].second} == {trusted, forged}
    assert view.note == trusted
    view.update(trusted, [])  # the same checkpoint again is fine


def test_fresh_view_accepts_the_empty_log(tmp_path: Path, log_key: SignerKey) -> None:
    with LedgerStore.open(tmp_path / "empty.db", log_key) as empty:
        view = LogView(log_key.verifier)
        view.update(empty.checkpoint(), [])
        assert (view.checkpoint.size, view.checkpoint.root) == (0, EMPTY_ROOT)
        assert view.note == empty.checkpoint()


def test_view_rejects_other_log_and_non_empty_proof_from_zero(store: LedgerStore, log_key: SignerKey) -> None:
    view = LogView(log_key.verifier)
    other = SignerKey.generate("mid.example/ledger")
    with pytest.raises(UnknownKeyError):
        view.update(sign_checkpoint(Checkpoint(log_key.name, 3, b"\x01" * 32), other), [])
    with pytest.raises(BadProofError):
        view.update(store.checkpoint(), [EMPTY_ROOT])
    with pytest.raises(RootMismatchError):
        view.update(sign_checkpoint(Checkpoint(log_key.name, 0, b"\x01" * 32), log_key), [])


def test_add_checkpoint_body_needs_matching_old_size(store: LedgerStore, log_key: SignerKey) -> None:
    sizes = store.checkpoint_sizes()
    view = LogView(log_key.verifier, store.checkpoint(sizes[1]))
    good = AddCheckpointBody(sizes[1], tuple(store.consistency_proof(sizes[1])), store.checkpoint())
    wrong_old = AddCheckpointBody(sizes[0], tuple(store.consistency_proof(sizes[0])), store.checkpoint())
    with pytest.raises(InconsistentError):
        view.add_checkpoint(wrong_old.encode())
    view.add_checkpoint(good.encode())
    assert view.checkpoint.size == store.size


def test_cosignature_format_matches_c2sp(log_key: SignerKey) -> None:
    cosigner = _witnesses(1)[0]
    text = Checkpoint(log_key.name, 5, b"\x02" * 32).text()
    sig = cosigner.cosign(text, NOW)
    assert sig.key_id == cosigner.verifier.key_id
    assert sig.signature[:8] == NOW.to_bytes(8, "big")
    assert len(sig.signature) == 72
    assert cosigned_message(text, NOW) == f"cosignature/v1\ntime {NOW}\n{text}".encode()
    # key id uses algorithm byte 0x04, so it differs from the same key's signed-note Ed25519 (0x01) key id.
    assert cosigner.verifier.key_id != SignerKey.parse(cosigner._key.text()).key_id
    assert CosignatureVerifier.parse(cosigner.verifier.text()) == cosigner.verifier
    assert verify_cosignature(text, sig, [cosigner.verifier]) == NOW
    with pytest.raises(BadKeyError):
        CosignatureVerifier.parse(log_key.verifier.text())  # a 0x01 key is not a cosignature key


def test_k_of_n_policy(store: LedgerStore, log_key: SignerKey) -> None:
    witnesses = _witnesses(4)
    policy = CosignaturePolicy(tuple(w.verifier for w in witnesses), quorum=3)
    note = store.checkpoint()
    text = _text(note)
    sigs = [w.cosign(text, NOW + i) for i, w in enumerate(witnesses)]

    assert policy.check(add_signatures(note, sigs[:3]), log_key.verifier).checkpoint.size == store.size
    with pytest.raises(QuorumNotMetError) as err:
        policy.check(add_signatures(note, sigs[:2]), log_key.verifier)
    assert err.value.details["found"] == 2

    older_text = _text(store.checkpoint(store.checkpoint_sizes()[0]))
    over_other = witnesses[2].cosign(older_text, NOW)
    with pytest.raises(QuorumNotMetError):
        policy.check(add_signatures(note, [*sigs[:2], over_other]), log_key.verifier)

    stranger = Cosigner(SignerKey.generate("stranger.example/witness"))
    with pytest.raises(QuorumNotMetError):
        policy.check(add_signatures(note, [*sigs[:2], stranger.cosign(text, NOW)]), log_key.verifier)

    duplicate = witnesses[0].cosign(text, NOW + 99)
    with pytest.raises(QuorumNotMetError):
        policy.check(add_signatures(note, [sigs[0], duplicate, sigs[1]]), log_key.verifier)

    with pytest.raises(MalformedError):
        CosignaturePolicy(tuple(w.verifier for w in witnesses), quorum=5)


def test_cosigned_checkpoint_still_needs_the_log_signature(store: LedgerStore, log_key: SignerKey) -> None:
    witnesses = _witnesses(2)
    policy = CosignaturePolicy(tuple(w.verifier for w in witnesses), quorum=2)
    text = _text(store.checkpoint())
    sigs = [w.cosign(text, NOW) for w in witnesses]
    impostor = SignerKey.generate(log_key.name)
    unsigned_by_log = add_signatures(sign_checkpoint(parse_checkpoint_text(text), impostor), sigs)
    with pytest.raises(UnknownKeyError):
        policy.check(unsigned_by_log, log_key.verifier)


def test_witness_cosigns_only_after_consistency(store: LedgerStore, log_key: SignerKey) -> None:
    sizes = store.checkpoint_sizes()
    cosigner = _witnesses(1)[0]
    witness = Witness(LogView(log_key.verifier, store.checkpoint(sizes[0])), cosigner)
    body = AddCheckpointBody(sizes[0], tuple(store.consistency_proof(sizes[0])), store.checkpoint())
    sig = witness.add_checkpoint(body.encode(), NOW)
    assert verify_cosignature(_text(store.checkpoint()), sig, [cosigner.verifier]) == NOW
    stored = store.attach_cosignatures(store.size, [sig], [cosigner.verifier])
    assert store.checkpoint() == stored
    CosignaturePolicy((cosigner.verifier,), 1).check(stored, log_key.verifier)

    fresh = Witness(LogView(log_key.verifier, store.checkpoint(sizes[1])), _witnesses(1)[0])
    with pytest.raises(InconsistentError):
        fresh.add_checkpoint(body.encode(), NOW)  # old size 2 is not what this witness trusts


def test_attach_rejects_bad_cosignatures_and_changes_nothing(store: LedgerStore, log_key: SignerKey) -> None:
    witnesses = _witnesses(2)
    before = store.checkpoint()
    wrong = witnesses[0].cosign(_text(store.checkpoint(store.checkpoint_sizes()[0])), NOW)
    good = witnesses[1].cosign(_text(before), NOW)
    with pytest.raises(BadSignatureError):
        store.attach_cosignatures(store.size, [good, wrong], [w.verifier for w in witnesses])
    with pytest.raises(UnknownKeyError):
        store.attach_cosignatures(store.size, [good], [witnesses[0].verifier])
    assert store.checkpoint() == before


def test_checkpoint_origin_must_match_log_key(log_key: SignerKey) -> None:
    with pytest.raises(BadNoteError):
        sign_checkpoint(Checkpoint("other.example/log", 1, b"\x00" * 32), log_key)
