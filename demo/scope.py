"""What the demo ran for real, and what it does not run yet: said plainly at the end of every run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

RAN_FOR_REAL = (
    ("identities", "Ed25519 keys generated, written 0600, read back; C2SP verifier keys"),
    ("signed reports", "DSSE envelopes sealed by each device key, verified before parsing, seq replay rule"),
    ("sensors", "PLAID recordings from the sktime wheel replayed into one SQLite sample store per household"),
    ("windows + fingerprint", "task windows cut from the stores; Merkle fingerprint in every report"),
    ("local training", "plaid-appliance@1 trained with torch by edge.federated.training.train_round"),
    ("attribution", "screens + exact Shapley per round on the buyer's validation data; aggregation by its weights"),
    ("ledger", "SQLite transparency log (WAL, synchronous=FULL), checkpoints signed by the MID log key"),
    ("member checks", "receipts verified offline; checkpoints moved only with consistency proofs; fork caught"),
    ("witnesses", "every member cosigns the latest checkpoint (tlog-cosignature); a 3-of-4 policy checks them"),
    ("reputation", "beta reputation from the rounds; the free rider falls below a job's minimum"),
    (
        "settlement",
        "quote, fee cap, largest-remainder split, record logged and recomputed; a later royalty split by the "
        "stored attribution; member statements",
    ),
)

NOT_YET = (
    (
        "MQTT broker",
        "no Mosquitto is started: envelopes are handed from device to coordinator in memory "
        "(the MQTT path is built and tested against a real Mosquitto: docs/messaging.md)",
    ),
    (
        "coordinator ingest service",
        "no ingest service, registry or dedup index runs: the demo calls the same protocol "
        "checks and appends to the ledger directly",
    ),
    (
        "Flower SuperLink / SuperNodes",
        "rounds run in this process, not on the Flower Deployment Engine (which `coordinator serve` and "
        "`agent run` do start, with TLS and node auth: docs/federated.md): no SuperLink, no DP clipping",
    ),
    (
        "buyer HTTP API",
        "the buyer's job, quote and payment are function calls; only revenue reports have an HTTP "
        "endpoint so far (`midgate buyer report-revenue`)",
    ),
)

TLS_NOTE = (
    "The demo runs in one process with no network: nothing is encrypted because nothing leaves the process. "
    "Everything outside the embedded demo (MQTT broker, Flower SuperLink, HTTP APIs) uses TLS."
)


def show_scope(console: Console) -> None:
    ran = Table("part", "what ran", title="ran for real in this demo")
    for part, what in RAN_FOR_REAL:
        ran.add_row(part, what)
    console.print(ran)
    missing = Table("not in the demo yet", "what that means here", title="what the demo does not run yet")
    for part, meaning in NOT_YET:
        missing.add_row(part, meaning)
    console.print(missing)
    console.print(TLS_NOTE)
