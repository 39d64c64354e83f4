"""`midgate demo`: until the end-to-end demo exists, show the wire protocol that it will run on.

Everything shown is real: Ed25519 keys written as 0600 files, DSSE envelopes, strict message models, the replay rule.
Each rejection is produced by the same code the coordinator's ingest runs, and the demo fails (exit 1) if any
outcome differs from the expected one, so `make demo` doubles as a smoke test of `protocol/`.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from protocol.envelope import KeyRing, decode, open_envelope
from protocol.errors import ProtocolError, Reason
from protocol.identity import SignerKey, load_signer_key, save_signer_key
from protocol.messages import ContributionReport, DpParams, require_newer_seq
from protocol.topics import UpKind, parse_topic, up_topic

app = typer.Typer(help="The end-to-end demo on embedded defaults (interim: the wire protocol only).")

MID = "mid-demo"
NOT_YET = (
    ("MQTT broker", "no Mosquitto is started; envelopes are handed over in memory"),
    ("coordinator service", "no ingest, registry or dashboard runs; the checks above are the ones the ingest runs"),
    ("Flower training", "no SuperLink/SuperNodes; the contribution report carries made-up hashes and losses"),
    ("ledger and receipts", "nothing is appended to a transparency log; no receipt or inclusion proof"),
    ("attribution and royalties", "no Shapley valuation, settlement or member statement"),
)


@app.callback(invoke_without_command=True)
def demo(ctx: typer.Context) -> None:
    """Generate identities, seal a contribution report, open it, and show four forgeries rejected."""
    if ctx.invoked_subcommand is not None:
        return
    console = Console()
    with tempfile.TemporaryDirectory(prefix="midgate-demo-") as tmp:
        ok = run(Path(tmp), console)
    if not ok:
        raise typer.Exit(1)


def run(workdir: Path, console: Console) -> bool:
    """The demo proper; True when every step had the expected outcome."""
    started = time.perf_counter()
    console.print(Panel.fit("midgate demo (interim): the signed wire protocol", style="bold"))

    mid_key, device_a, device_b = _identities(workdir, console)
    ring = KeyRing([device_a.verifier, device_b.verifier])
    report = _sample_report(seq=41)
    envelope = report.seal(device_a)
    topic = up_topic(MID, "dev-a", UpKind.REPORT)
    console.print(f"\n[bold]2. device dev-a seals a contribution report[/] ({len(envelope)} bytes, DSSE, Ed25519)")
    console.print(f"   topic   {topic}  -> parsed as {parse_topic(topic).direction}/{parse_topic(topic).kind}")
    preview = json.loads(envelope)
    preview["payload"] = preview["payload"][:40] + "..."
    console.print(f"   envelope {json.dumps(preview)}", soft_wrap=True, highlight=False)

    console.print("\n[bold]3. the coordinator verifies first, then parses[/]")
    verified = open_envelope(envelope, ring, ContributionReport.PAYLOAD_TYPE)
    opened = decode(verified, ContributionReport)
    require_newer_seq(None, opened.seq, verified.key_id)
    console.print(
        f"   [green]accepted[/] signer={verified.signer.name} key_id={verified.key_id} seq={opened.seq} "
        f"round={opened.round} examples={opened.examples} loss {opened.loss_before} -> {opened.loss_after}"
    )
    last_seq = {verified.key_id: opened.seq}

    console.print("\n[bold]4. what the coordinator refuses[/]")
    stranger = SignerKey.generate("dev-x")

    def replay() -> None:
        again = open_envelope(envelope, ring, ContributionReport.PAYLOAD_TYPE)
        require_newer_seq(last_seq.get(again.key_id), decode(again, ContributionReport).seq, again.key_id)

    def insecure_key_file() -> None:
        path = workdir / "dev-b.key"
        os.chmod(path, 0o644)
        load_signer_key(path)

    attempts: list[tuple[str, Reason, Callable[[], object]]] = [
        ("a copy with one payload bit flipped", Reason.BAD_SIGNATURE, lambda: _open(_tampered(envelope), ring)),
        (
            "a report signed by a key the MID never enrolled",
            Reason.UNKNOWN_KEY,
            lambda: _open(report.seal(stranger), ring),
        ),
        ("the same report delivered again (seq 41 again)", Reason.REPLAYED, replay),
        ("an envelope larger than 64 KiB", Reason.TOO_LARGE, lambda: _open(b" " * (64 * 1024 + 1), ring)),
        ("dev-b's private key file after chmod 644", Reason.INSECURE_KEY_FILE, insecure_key_file),
    ]
    table = Table("attempt", "expected", "got", "detail")
    all_ok = True
    for label, expected, attempt in attempts:
        got, detail = _reason_of(attempt)
        all_ok &= got == expected
        style = "green" if got == expected else "bold red"
        table.add_row(label, str(expected), f"[{style}]{got}[/]", detail)
    console.print(table)

    missing = Table("not part of this demo yet", "what that means here", title="5. what does not exist yet")
    for part, meaning in NOT_YET:
        missing.add_row(part, meaning)
    console.print(missing)
    verdict = "[green]all outcomes as expected[/]" if all_ok else "[bold red]an outcome differed[/]"
    console.print(f"\n{verdict} in {time.perf_counter() - started:.2f} s; keys were in {workdir} (now deleted)")
    console.print(f"MID key {mid_key.verifier.text()}")
    return all_ok


def _identities(workdir: Path, console: Console) -> tuple[SignerKey, SignerKey, SignerKey]:
    keys = []
    table = Table("identity", "C2SP verifier key", "file mode", title="1. identities (Ed25519, one per device per MID)")
    for name in (MID, "dev-a", "dev-b"):
        path = workdir / f"{name}.key"
        save_signer_key(path, SignerKey.generate(name))
        key = load_signer_key(path)
        keys.append(key)
        table.add_row(name, key.verifier.text(), oct(path.stat().st_mode & 0o777))
    console.print(table)
    return keys[0], keys[1], keys[2]


def _sample_report(seq: int) -> ContributionReport:
    return ContributionReport(
        run_id=1,
        round=1,
        node_id=1_234_567_890_123,
        seq=seq,
        device_time_ms=int(time.time() * 1000),
        task_id="har-cnn",
        task_version=1,
        round_nonce=os.urandom(16).hex(),
        global_model_sha256="a1" * 32,
        update_sha256="b2" * 32,
        examples=256,
        dataset_fingerprint="c3" * 32,
        loss_before=1.42,
        loss_after=1.05,
        seconds=8.5,
        dp=DpParams(clipping_norm=1.0, noise_multiplier=0.8),
    )


def _open(envelope: bytes, ring: KeyRing) -> ContributionReport:
    return decode(open_envelope(envelope, ring, ContributionReport.PAYLOAD_TYPE), ContributionReport)


def _tampered(envelope: bytes) -> bytes:
    doc = json.loads(envelope)
    payload = bytearray(base64.b64decode(doc["payload"]))
    payload[len(payload) // 2] ^= 0x01
    doc["payload"] = base64.b64encode(payload).decode()
    return json.dumps(doc, separators=(",", ":")).encode()


def _reason_of(attempt: Callable[[], object]) -> tuple[str, str]:
    try:
        attempt()
    except ProtocolError as exc:
        return str(exc.reason), exc.message
    return "accepted", "(no error raised)"
