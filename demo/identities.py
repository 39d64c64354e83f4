"""The demo's keys: the MID's log key and one Ed25519 device key per household, written as 0600 files and read back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from protocol.identity import SignerKey, load_signer_key, save_signer_key

# The log key's name is the ledger's origin (docs/ledger.md), so one vkey names both the log and its signer.
MID = "mid-demo"
LOG_ORIGIN = "mid-demo.example/ledger"


@dataclass(frozen=True)
class Identities:
    log_key: SignerKey
    devices: dict[str, SignerKey]
    witnesses: dict[str, SignerKey]
    """Each member's witness key, used only to cosign checkpoints (distinct from its device key, docs/ledger.md)."""
    key_files: dict[str, Path]


def create_identities(workdir: Path, device_names: list[str], console: Console) -> Identities:
    """Generate, save (0600) and reload every key, so the demo signs with what a device would load from disk."""
    keys_dir = workdir / "keys"
    keys_dir.mkdir(exist_ok=True)
    table = Table(
        "identity",
        "C2SP verifier key",
        "file mode",
        title="identities (Ed25519: one per device per MID, one witness key per member)",
    )
    loaded: dict[str, SignerKey] = {}
    files: dict[str, Path] = {}
    witness_names = {f"{name}-witness": name for name in device_names}
    for name in [LOG_ORIGIN, *device_names, *witness_names]:
        path = keys_dir / (name.replace("/", "_") + ".key")
        save_signer_key(path, SignerKey.generate(name))
        loaded[name] = load_signer_key(path)
        files[name] = path
        table.add_row(name, loaded[name].verifier.text(), oct(path.stat().st_mode & 0o777))
    console.print(table)
    (workdir / "log.vkey").write_text(loaded[LOG_ORIGIN].verifier.text() + "\n")
    devices = {n: loaded[n] for n in device_names}
    witnesses = {member: loaded[name] for name, member in witness_names.items()}
    return Identities(loaded[LOG_ORIGIN], devices, witnesses, files)
