"""A client written from docs/protocol.md alone interoperates with the coordinator (issue 16, item 7).

Everything above "The harness" uses only what docs/protocol.md says, the standard library, raw Ed25519 from
`cryptography` and paho-mqtt: nothing of midgate (a test checks this module's imports). It builds its own key, key
id and C2SP key text, signs its messages as DSSE envelopes with a hand-made PAE, verifies the invite token, the grant,
C2SP signed notes, checkpoints, tlog-proofs and RFC 9162 inclusion and consistency proofs by hand, and cosigns a
checkpoint. The harness starts what an operator runs, as the messaging tests do: Mosquitto from `broker-config` (TLS,
password logins, ACLs), `coordinator serve`, and an invite from `midgate coordinator invite`; those imports live
inside the test.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import queue
import secrets
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

# --- the client: docs/protocol.md and nothing else -------------------------------------------------------------------

ENROLMENT_REQUEST = "application/vnd.midgate.enrolment-request.v1+json"
ENROLMENT_RESPONSE = "application/vnd.midgate.enrolment-response.v1+json"
RECEIPT = "application/vnd.midgate.receipt.v1+json"
HEARTBEAT = "application/vnd.midgate.heartbeat.v1+json"
STRIKE_VOTE = "application/vnd.midgate.strike-vote.v1+json"
CONTRIBUTION_REPORT = "application/vnd.midgate.contribution-report.v2+json"
CHECKPOINT_ANNOUNCEMENT = "application/vnd.midgate.checkpoint-announcement.v1+json"
REVENUE_REPORT = "application/vnd.midgate.revenue-report.v1+json"
LEAF_ENROL, LEAF_CONTRIBUTION, LEAF_STRIKE = 1, 5, 9
EM_DASH = "\u2014 "


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def key_id(name: str, public: bytes, algorithm: int) -> bytes:
    """C2SP signed-note: SHA-256(name || LF || algorithm byte || public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([algorithm]) + public).digest()[:4]


@dataclass(frozen=True)
class PublicKey:
    """A named Ed25519 public key and its C2SP verifier key text `name+hex(key id)+base64(0x01 || key)`."""

    name: str
    raw: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.raw, 0x01)

    def text(self) -> str:
        material = b64(bytes([0x01]) + self.raw)
        return f"{self.name}+{self.key_id.hex()}+{material}"

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, kid, material = text.split("+", 2)
        raw = unb64(material)
        assert raw[0] == 0x01 and len(raw) == 33, "an Ed25519 verifier key is 0x01 || 32 bytes"
        key = cls(name, raw[1:])
        assert key.key_id.hex() == kid, "the key id in a key text is the key's"
        return key

    def verifies(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class PrivateKey:
    def __init__(self, name: str) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public = PublicKey(name, self._key.public_key().public_bytes_raw())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def canonical(message: dict[str, Any]) -> bytes:
    """Canonical encoding: every field, keys sorted, no whitespace, UTF-8, non-ASCII literal."""
    return json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def seal(payload_type: str, message: dict[str, Any], key: PrivateKey) -> bytes:
    payload = canonical(message)
    signature = {"keyid": key.public.key_id.hex(), "sig": b64(key.sign(pae(payload_type, payload)))}
    envelope = {"payloadType": payload_type, "payload": b64(payload), "signatures": [signature]}
    return json.dumps(envelope, separators=(",", ":")).encode()


def open_signed(envelope: bytes, signer: PublicKey, payload_type: str) -> dict[str, Any]:
    """The message of a DSSE envelope `signer` signed, as JSON, after checking the signature over the exact bytes."""
    document = json.loads(envelope)
    assert set(document) == {"payloadType", "payload", "signatures"}
    assert document["payloadType"] == payload_type
    payload = unb64(document["payload"])
    mine = [s for s in document["signatures"] if s["keyid"] == signer.key_id.hex()]
    assert mine, "signed by the expected key"
    assert all(signer.verifies(unb64(s["sig"]), pae(payload_type, payload)) for s in mine)
    message: dict[str, Any] = json.loads(payload)
    assert canonical(message) == payload, "one message, one byte string"
    return message


def check_invite(token: str, mid: str, mid_key: PublicKey, now_ms: int) -> None:
    """The token: unpadded base64url of invite id (12) || expiry (6, big-endian ms) || signature (64)."""
    assert len(token) == 110 and "=" not in token
    raw = base64.urlsafe_b64decode(token + "==")
    assert len(raw) == 82
    invite_id, expiry, signature = raw[:12], raw[12:18], raw[18:]
    assert mid_key.verifies(signature, b"midgate-invite-v1\n" + mid.encode() + b"\n" + invite_id + expiry)
    assert int.from_bytes(expiry, "big") > now_ms


# Merkle (RFC 9162 section 2.1) and the ledger's leaves


def leaf(kind: int, signed: bytes) -> bytes:
    return b"\x01" + bytes([kind]) + len(signed).to_bytes(4, "big") + signed


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion(index: int, size: int, hashed_leaf: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.3.2."""
    assert 0 <= index < size
    fn, sn, r = index, size - 1, hashed_leaf
    for p in path:
        assert sn != 0, "inclusion path too long"
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0, "inclusion path too short"
    return r


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: list[bytes]) -> None:
    """RFC 9162 section 2.1.4.2 (from size 0: an empty proof, always valid)."""
    assert 0 <= first <= second
    if first == 0 or first == second:
        assert proof == [] and (first == 0 or first_root == second_root)
        return
    assert proof
    if first & (first - 1) == 0:
        proof = [first_root, *proof]
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        assert sn != 0
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    assert (fr, sr, sn) == (first_root, second_root, 0)


# C2SP signed notes, checkpoints and tlog-proofs


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    text: str
    note: bytes


def open_checkpoint(note: bytes, mid_key: PublicKey) -> Checkpoint:
    """A C2SP signed note whose text is a checkpoint, with a verifying line by the MID key; other lines ignored."""
    decoded = note.decode()
    head, _, signatures = decoded.partition("\n\n")
    text = head + "\n"
    assert signatures.endswith("\n")
    signed_by_mid = False
    for line in signatures[:-1].split("\n"):
        assert line.startswith(EM_DASH)
        name, signature = line[len(EM_DASH) :].split(" ")
        raw = unb64(signature)
        if name == mid_key.name and raw[:4] == mid_key.key_id:
            assert mid_key.verifies(raw[4:], text.encode()), "the MID's signature line verifies"
            signed_by_mid = True
    assert signed_by_mid
    origin, size, root = head.split("\n")[:3]
    assert origin == mid_key.name and size == str(int(size))
    return Checkpoint(origin, int(size), unb64(root), text, note)


def open_tlog_proof(text: str, mid_key: PublicKey) -> tuple[int, list[bytes], Checkpoint]:
    proof, _, note = text.partition("\n\n")
    lines = proof.split("\n")
    assert lines[0] == "c2sp.org/tlog-proof@v1"
    lines = lines[1:]
    if lines[0].startswith("extra "):
        lines = lines[1:]
    assert lines[0].startswith("index ")
    return int(lines[0].removeprefix("index ")), [unb64(h) for h in lines[1:]], open_checkpoint(note.encode(), mid_key)


def cosignature_line(checkpoint: Checkpoint, key: PrivateKey, now_s: int) -> str:
    """C2SP tlog-cosignature/v1 with the device key: key id with algorithm 0x04, signature over header, time, text."""
    signed = f"cosignature/v1\ntime {now_s}\n{checkpoint.text}".encode()
    kid = key_id(key.public.name, key.public.raw, 0x04)
    return f"{EM_DASH}{key.public.name} {b64(kid + now_s.to_bytes(8, 'big') + key.sign(signed))}\n"


# HTTP and MQTT


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request; refusals are answers too."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.headers.get("Content-Type", ""), refused.read()


def refusal(answer: tuple[int, str, bytes]) -> tuple[int, str]:
    """(status, reason) of a refusal, after checking its documented shape."""
    status, content_type, body = answer
    assert content_type == "application/json", answer
    document = json.loads(body)
    assert set(document) == {"reason", "message"} and len(document["message"]) <= 1024
    return status, str(document["reason"])


class MqttSession:
    """A device's MQTT 5 session with its granted login: received messages in a queue, PUBACK reason codes kept."""

    def __init__(self, broker: dict[str, Any], client_id: str, password: str | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.client.username_pw_set(broker["username"], password or broker["password"])
        if broker["tls"]:
            # Trust only the MID's CA, and check that the certificate names the granted host.
            self.client.tls_set_context(ssl.create_default_context(cadata=broker["ca_pem"]))
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.held: list[tuple[str, bytes]] = []
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc.value)
        self.client.on_message = lambda c, u, m: self.received.put((m.topic, m.payload))
        self.client.connect(broker["host"], broker["port"])
        self.client.loop_start()
        self.code = self.connack.get(timeout=20)

    def subscribe(self, *filters: str) -> list[int]:
        self.client.subscribe([(f, 1) for f in filters])
        return self.subacks.get(timeout=20)

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 20
        while info.mid not in self.pubacks:
            assert time.monotonic() < deadline, f"no PUBACK for {topic}"
            time.sleep(0.01)
        return self.pubacks[info.mid]

    def next_on(self, topic: str, timeout_s: float = 30.0) -> bytes:
        """The next message received on `topic`; messages on other topics wait for their own call."""
        for i, (got, payload) in enumerate(self.held):
            if got == topic:
                del self.held[i]
                return payload
        deadline = time.monotonic() + timeout_s
        while True:
            got, payload = self.received.get(timeout=max(0.01, deadline - time.monotonic()))
            if got == topic:
                return payload
            self.held.append((got, payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(broker: dict[str, Any], client_id: str, password: str | None = None) -> MqttSession:
    """The grant's login works once the broker has reread its password file: retry a refused first connection."""
    deadline = time.monotonic() + 20
    while True:
        session = MqttSession(broker, client_id, password)
        if session.code == 0 or time.monotonic() > deadline:
            return session
        session.close()
        time.sleep(0.2)


class TrustedLog:
    """The device's trusted checkpoint, moved only by consistency proofs; checks receipts' paths against it."""

    def __init__(self, base_url: str, mid_key: PublicKey, first: Checkpoint) -> None:
        self.base_url = base_url
        self.mid_key = mid_key
        self.trusted = first

    def check(self, note: bytes) -> Checkpoint:
        checkpoint = open_checkpoint(note, self.mid_key)
        old, new = sorted((self.trusted, checkpoint), key=lambda c: c.size)
        status, content_type, body = http("GET", f"{self.base_url}/v1/consistency?old={old.size}&new={new.size}")
        assert (status, content_type) == (200, "text/plain; charset=utf-8")
        verify_consistency(old.size, new.size, old.root, new.root, [unb64(h) for h in body.decode().splitlines()])
        if checkpoint.size > self.trusted.size:
            self.trusted = checkpoint
        return checkpoint

    def receipted(self, batch: bytes, sent: dict[str, tuple[int, bytes]]) -> set[str]:
        """The seqs a ReceiptBatch proves, each for the exact envelope sent under it (seq -> (leaf kind, envelope))."""
        document = json.loads(batch)
        assert set(document) == {"v", "checkpoint", "receipts", "issued_ms"} and document["v"] == 1
        checkpoint = self.check(document["checkpoint"].encode())
        proven = set()
        for receipt in document["receipts"]:
            kind, envelope = sent[receipt["seq"]]
            path = [unb64(h) for h in receipt["path"]]
            hashed = leaf_hash(leaf(kind, envelope))
            assert root_from_inclusion(int(receipt["leaf_index"]), checkpoint.size, hashed, path) == checkpoint.root
            proven.add(receipt["seq"])
        return proven


# --- the harness --------------------------------------------------------------------------------------------------

_MIDGATE = ("protocol", "runtime", "edge", "coordinator", "midgate_cli", "demo", "mqtt_fixtures")


def test_the_client_imports_nothing_of_midgate() -> None:
    tree = ast.parse(Path(__file__).read_text())
    names = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert names and not [name for name in names if name.split(".")[0] in _MIDGATE]


def test_the_doc_s_worked_example_checks_out_with_the_client_s_own_code() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = PublicKey("d-example", Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw())
    assert f"the verifier key text `{public.text()}`" in doc
    (envelope,) = [line for line in doc.splitlines() if f'"keyid":"{public.key_id.hex()}"' in line]
    message = open_signed(envelope.encode(), public, HEARTBEAT)
    assert message == {
        "agent_version": "",
        "device_time_ms": 1767225600000,
        "outbox_pending": 0,
        "samples_stored": 0,
        "seq": "1",
        "status": "idle",
        "v": 1,
    }


@pytest.mark.slow
def test_a_client_written_from_the_docs_enrols_publishes_and_verifies_its_receipts(tmp_path: Path) -> None:
    from mqtt_fixtures import (
        MessagingStack,
        MosquittoProcess,
        coordinator_toml,
        free_port,
        tls_broker_config_toml,
        wait_until,
    )
    from typer.testing import CliRunner

    from coordinator.cli import app as coordinator_app

    stack = MessagingStack(tmp_path)
    broker_dir = tmp_path / "coordinator" / "broker"
    tls_port, local_port = free_port(), free_port()
    # The coordinator uses the plain loopback listener; devices are granted the TLS one with the MID CA, as deployed.
    buyer = PrivateKey("acme")
    config = coordinator_toml(
        stack.data_dir,
        stack.mid,
        local_port,
        stack.http_port,
        broker_extra=f'pid_file = "{broker_dir}/mosquitto.pid"',
        plain_devices=False,
    ).replace(f'[broker_config]\noutput_dir = "{broker_dir}"\n', "")
    buyers = f'[buyers.keys]\nacme = "{buyer.public.text()}"\n'
    stack.config.write_text(config + tls_broker_config_toml(broker_dir, tls_port, local_port) + buyers)
    failed = True
    try:
        result = CliRunner().invoke(coordinator_app, ["broker-config", "--config", str(stack.config)])
        assert result.exit_code == 0, result.output
        stack.broker = MosquittoProcess(broker_dir, (broker_dir / "mosquitto.conf").read_text(), local_port)
        stack.broker.start()
        stack.start_coordinator()
        invited = CliRunner().invoke(coordinator_app, ["invite", "ana", "--config", str(stack.config)])
        assert invited.exit_code == 0, invited.output
        token = invited.output.strip()
        base = f"http://127.0.0.1:{stack.http_port}"
        secrets_seen = _client_session(base, token, buyer, stack.metric)
        log = stack.coordinator.log_text() if stack.coordinator else ""
        _rejections_were_logged_as_the_docs_say(log, stack.mid)
        for secret in [token, *secrets_seen]:
            assert secret not in log, "a secret in the coordinator's log"
        wait_until(lambda: stack.metric("midgate_ingest_heartbeats_total") == 1, 10, "the heartbeat counted")
        failed = False
    finally:
        stack.close(failed)


def _client_session(base: str, token: str, buyer: PrivateKey, metric: Any) -> list[str]:
    """Everything the client does; returns the secrets it was given (broker passwords), to look for in logs."""
    now_ms = time.time_ns() // 1_000_000

    # GET /v1/info, then the invite must verify under the key it names before anything else is trusted.
    status, content_type, body = http("GET", f"{base}/v1/info")
    assert (status, content_type) == (200, "application/json")
    info = json.loads(body)
    assert set(info) == {"mid", "mid_key"}
    mid, mid_key = info["mid"], PublicKey.parse(info["mid_key"])
    assert mid_key.name == f"midgate/{mid}"
    check_invite(token, mid, mid_key, now_ms)

    device = "d-" + secrets.token_hex(8)
    key = PrivateKey(device)

    def enrolment_request(signer: PrivateKey, name: str) -> bytes:
        request = {
            "v": 1,
            "mid": mid,
            "device": name,
            "device_key": signer.public.text(),
            "invite_token": token,
            "seq": "0",
            "device_time_ms": now_ms,
            "agent_version": "doc-client/1",
            "flower_key": "",
        }
        return seal(ENROLMENT_REQUEST, request, signer)

    # A key not named after its device is refused, and leaves the invite unused; so do malformed and huge bodies.
    assert refusal(http("POST", f"{base}/v1/enrol", enrolment_request(PrivateKey("someone-else"), device))) == (
        400,
        "bad_key",
    )
    assert refusal(http("POST", f"{base}/v1/enrol", b"{}")) == (400, "malformed")
    assert refusal(http("POST", f"{base}/v1/enrol", b" " * (16 * 1024 + 1))) == (413, "too_large")
    assert http("GET", f"{base}/v1/enrol")[0] == 405 and http("GET", f"{base}/v1/nowhere")[0] == 404

    request = enrolment_request(key, device)
    status, content_type, body = http("POST", f"{base}/v1/enrol", request)
    assert (status, content_type) == (200, "application/json"), body
    grant = json.loads(body)
    assert set(grant) == {"response", "receipt", "broker", "superlink_ca_pem"} and grant["superlink_ca_pem"] == ""
    response = open_signed(unb64(grant["response"]), mid_key, ENROLMENT_RESPONSE)
    assert (response["accepted"], response["mid"], response["device"]) == (True, mid, device)
    assert (response["mid_key"], response["request_seq"], response["member"]) == (mid_key.text(), "0", "ana")
    receipt = open_signed(unb64(grant["receipt"]), mid_key, RECEIPT)
    assert (receipt["device_key_id"], receipt["seq"]) == (key.public.key_id.hex(), "0")
    assert receipt["envelope_sha256"] == hashlib.sha256(request).hexdigest()
    index, path, first = open_tlog_proof(receipt["tlog_proof"], mid_key)
    assert index == int(receipt["leaf_index"])
    assert root_from_inclusion(index, first.size, leaf_hash(leaf(LEAF_ENROL, request)), path) == first.root
    log = TrustedLog(base, mid_key, first)
    broker = grant["broker"]
    assert set(broker) == {"host", "port", "tls", "ca_pem", "username", "password"}
    assert broker["tls"] and broker["ca_pem"].startswith("-----BEGIN CERTIFICATE-----") and broker["username"] == device

    # The same request again: the same device and leaf, a fresh password that replaces the first.
    status, _, body = http("POST", f"{base}/v1/enrol", request)
    again = json.loads(body)
    assert status == 200 and again["broker"]["password"] != broker["password"]
    assert open_signed(unb64(again["receipt"]), mid_key, RECEIPT)["leaf_index"] == receipt["leaf_index"]
    # Any other request under the used invite is refused.
    other = PrivateKey("d-" + secrets.token_hex(8))
    assert refusal(http("POST", f"{base}/v1/enrol", enrolment_request(other, other.public.name))) == (
        409,
        "invite_used",
    )

    # MQTT with the granted login; the first password no longer opens the broker.
    first_password, broker = broker["password"], again["broker"]
    session = connect(broker, device)
    assert session.code == 0
    stale = MqttSession(broker, device + "-stale", first_password)  # once the new one works, the old one is gone
    assert stale.code in (134, 135)
    stale.close()
    try:
        down, checkpoint_topic = f"mid/{mid}/dev/{device}/down/+", f"mid/{mid}/ledger/checkpoint"
        assert session.subscribe(down, checkpoint_topic, f"mid/{mid}/broadcast/+") == [1, 1, 1]
        _publish_and_verify(session, log, mid, device, key)
        announcement = open_signed(session.next_on(checkpoint_topic), mid_key, CHECKPOINT_ANNOUNCEMENT)
        assert int(announcement["tree_size"]) == log.check(announcement["checkpoint"].encode()).size
    finally:
        session.close()

    _checkpoints_and_witnessing(base, mid_key, log, key)
    _revenue_reports(base, mid, buyer, now_ms)
    status, content_type, body = http("GET", f"{base}/metrics")
    assert (status, content_type) == (200, "text/plain; version=1.0.0; charset=utf-8")
    assert b'midgate_ingest_rejected_total{reason="invite_used"} 1.0' in body
    assert metric("midgate_ingest_rejected_total", 'reason="equivocation"') == 1
    return [first_password, broker["password"]]


def _publish_and_verify(session: MqttSession, log: TrustedLog, mid: str, device: str, key: PrivateKey) -> None:
    up = f"mid/{mid}/dev/{device}/up/"
    now_ms = time.time_ns() // 1_000_000

    def h(label: str) -> str:
        return hashlib.sha256(label.encode()).hexdigest()

    heartbeat = {
        "v": 1,
        "seq": "1",
        "device_time_ms": now_ms,
        "status": "idle",
        "samples_stored": 0,
        "outbox_pending": 0,
        "agent_version": "",
    }
    strike = {
        "v": 1,
        "seq": "2",
        "device_time_ms": now_ms,
        "target_buyer": "acme",
        "target_purpose": None,
        "start_ms": now_ms,
        "end_ms": None,
        "withdraw": False,
    }
    report = {
        "v": 2,
        "seq": "3",
        "device_time_ms": now_ms,
        "round_nonce": secrets.token_hex(16),
        "run_id": "7",
        "round": 1,
        "node_id": "42",
        "task_id": "appliance-load",
        "task_version": 1,
        "global_model_sha256": h("global"),
        "update_sha256": h("update"),
        "examples": 128,
        "dataset_fingerprint": h("windows"),
        "loss_before": 0.9,
        "loss_after": 0.5,
        "seconds": 1.5,
        "dp": None,
        "gradient_sha256": None,
        "drift_offset_sha256": None,
    }
    sent = {
        "2": (LEAF_STRIKE, seal(STRIKE_VOTE, strike, key)),
        "3": (LEAF_CONTRIBUTION, seal(CONTRIBUTION_REPORT, report, key)),
    }
    assert session.publish(up + "heartbeat", seal(HEARTBEAT, heartbeat, key)) == 0
    assert session.publish(up + "strike", sent["2"][1]) == 0
    assert session.publish(up + "report", sent["3"][1]) == 0
    assert session.publish(f"mid/{mid}/dev/d-someone-else/up/report", sent["3"][1]) == 135  # the ACL
    receipt_topic = f"mid/{mid}/dev/{device}/down/receipt"
    proven: set[str] = set()
    while proven != {"2", "3"}:
        proven |= log.receipted(session.next_on(receipt_topic), sent)

    # A resend of a logged statement is answered with its receipt again; other bytes under its seq (equivocation) and
    # a heartbeat that is not newer (replayed) get no answer and are logged at the MID.
    assert session.publish(up + "strike", sent["2"][1]) == 0
    assert log.receipted(session.next_on(receipt_topic), sent) == {"2"}
    assert session.publish(up + "strike", seal(STRIKE_VOTE, {**strike, "withdraw": True}, key)) == 0
    assert session.publish(up + "heartbeat", seal(HEARTBEAT, heartbeat, key)) == 0


def _checkpoints_and_witnessing(base: str, mid_key: PublicKey, log: TrustedLog, key: PrivateKey) -> None:
    status, content_type, note = http("GET", f"{base}/v1/checkpoint")
    assert (status, content_type) == (200, "text/plain; charset=utf-8")
    latest = log.check(note)
    assert refusal(http("GET", f"{base}/v1/checkpoint?size={latest.size + 1}")) == (400, "bad_proof")

    status, content_type, body = http("GET", f"{base}/v1/witnesses")
    assert (status, content_type) == (200, "application/json")
    witnesses = json.loads(body)
    assert witnesses["quorum"] == 1
    cosigning = key_id(key.public.name, key.public.raw, 0x04)
    material = b64(bytes([0x04]) + key.public.raw)
    expected = f"{key.public.name}+{cosigning.hex()}+{material}"
    assert witnesses["witnesses"] == [{"device": key.public.name, "key": expected}]

    status, _, note = http("GET", f"{base}/v1/checkpoint/candidate")
    candidate = log.check(note)
    body = (candidate.text + "\n" + cosignature_line(candidate, key, int(time.time()))).encode()
    status, content_type, answer = http("POST", f"{base}/v1/cosignature", body)
    assert (status, content_type) == (200, "application/json")
    assert json.loads(answer) == {"size": candidate.size, "cosignatures": 1, "witnessed": True}
    status, _, note = http("GET", f"{base}/v1/checkpoint/witnessed")
    assert status == 200 and log.check(note).size == candidate.size


def _revenue_reports(base: str, mid: str, buyer: PrivateKey, now_ms: int) -> None:
    report = {
        "v": 1,
        "mid": mid,
        "buyer": "acme",
        "model_id": "appliance-model",
        "model_version": "job-1:0123456789abcdef",
        "period_start_ms": now_ms - 86_400_000,
        "period_end_ms": now_ms,
        "amount_minor": 100_000,
        "currency": "EUR",
        "seq": "1",
        "issued_ms": now_ms,
    }
    revenue = f"{base}/v1/buyer/revenue"
    assert refusal(http("POST", revenue, seal(REVENUE_REPORT, report, buyer))) == (404, "unknown_model")
    elsewhere = seal(REVENUE_REPORT, {**report, "mid": "elsewhere"}, buyer)
    assert refusal(http("POST", revenue, elsewhere)) == (422, "policy_violation")
    assert refusal(http("POST", revenue, seal(REVENUE_REPORT, report, PrivateKey("acme")))) == (403, "unknown_key")


def _rejections_were_logged_as_the_docs_say(log: str, mid: str) -> None:
    """docs/protocol.md, "Rejections are counted and logged": one WARNING JSON line per rejection."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    warnings = [line for line in lines if line["level"] == "warning"]
    refused = sorted((line["reason"], line["status"]) for line in warnings if line["msg"] == "request refused")
    assert refused == sorted(
        [
            ("bad_key", 400),
            ("malformed", 400),
            ("too_large", 413),
            ("invite_used", 409),
            ("bad_proof", 400),
            ("unknown_model", 404),
            ("policy_violation", 422),
            ("unknown_key", 403),
        ]
    )
    rejected = sorted(
        (line["reason"], line["topic"].rsplit("/", 1)[1]) for line in warnings if line["msg"] == "message rejected"
    )
    assert rejected == [("equivocation", "strike"), ("replayed", "heartbeat")]
    assert all(
        mid in line["topic"] and line["error"].startswith(line["reason"]) for line in warnings if "topic" in line
    )
