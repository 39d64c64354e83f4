"""What the demo ran, what it did not, and where it ran without TLS: printed at the end of every run, and kept true
(docs/demo.md has the same tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from demo.broker import BrokerKind


def show_scope(console: Console, broker: BrokerKind, statements_checked: bool) -> None:
    ran = Table("part", "how it ran", title="what ran, as real processes", title_justify="left")
    if broker is BrokerKind.MOSQUITTO:
        ran.add_row(
            "MQTT broker", "Mosquitto from `coordinator broker-config`: logins, per-device ACLs, TLS for devices"
        )
    else:
        ran.add_row("MQTT broker", "EMBEDDED amqtt instead of Mosquitto: anonymous, no ACL, no TLS, MQTT 3.1.1")
    ran.add_row("coordinator", "`coordinator serve`: enrolment, MQTT ingest, ledger, receipts, buyer API, job ledger")
    ran.add_row("Flower", "serve's SuperLink (TLS, SuperNode authentication) and each device's SuperNode and ClientApp")
    ran.add_row(
        "members",
        "`agent run` per household: replay into its sample store, windows, signed reports, receipts, heartbeats "
        "saying paused or striking, cosigned checkpoints; `agent pause`, `strike`, `statement`, `receipts --verify`",
    )
    ran.add_row(
        "operator, buyer",
        "`coordinator invite`, `devices`, `job start`, `job show`, `job settle`; `buyer keygen`, `report-revenue`",
    )
    console.print(ran)

    missing = Table("part", "what that means here", title="what the demo does not run", title_justify="left")
    missing.add_row(
        "buyer job API",
        "no quote, escrow or provenance manifest: the operator starts the job and records "
        "the payment with `job settle`",
    )
    missing.add_row(
        "free rider",
        "no agent sends a data-free update (its ClientApp always trains): the planted rider "
        "holds 10 recordings of one common appliance",
    )
    missing.add_row("knob, consent", "not built: every member prices at the MID's base price and consents to all")
    missing.add_row(
        "strike quorum",
        "a vote is logged and the MID leaves its member out of the target's jobs; no quorum, no stop-selling",
    )
    if not statements_checked:
        missing.add_row("member statements", "members do not yet verify their statement on their own agent")
    missing.add_row(
        "dashboard",
        "`serve` serves it under /operator, but the demo sets no operator password and opens no browser; it writes the "
        "job report and prints the member pages' addresses",
    )
    console.print(missing)
    if broker is BrokerKind.MOSQUITTO:
        devices = "devices reach the broker's listener and the SuperLink over TLS with the MID's CA"
    else:
        devices = "devices reach the SuperLink over TLS with the MID's CA, but the embedded broker in plain TCP"
    console.print(
        f"TLS: {devices}; the coordinator uses the broker's plain loopback listener, and the enrolment and buyer "
        "HTTP endpoint is plain HTTP on loopback (in production a TLS proxy fronts it). Outside the demo, TLS "
        "everywhere.",
    )
