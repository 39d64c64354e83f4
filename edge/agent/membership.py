"""One agent, several MIDs: each membership is a folder (0700, like the data folder) with its own key, broker
credentials and outbox.

{data_dir}/mids/{mid}/device.key       Ed25519 signer key for this MID only (0600), so memberships are unlinkable
{data_dir}/mids/{mid}/membership.json  MID key, device id, enrolment URL, broker credentials (0600: a password)
{data_dir}/mids/{mid}/ca.pem           the MID's CA certificate, when its broker uses TLS
{data_dir}/mids/{mid}/outbox.sqlite    the outbox (edge.agent.outbox, 0600)
{data_dir}/mids/{mid}/daemon-status.json what the running daemon tells `agent status` (edge.agent.daemon_status)
{data_dir}/mids/{mid}/flower/          the device's Flower SuperNode key pair for this MID (private key 0600)
{data_dir}/mids/{mid}/superlink-ca.pem the CA of the MID's SuperLink, when the MID registered the Flower key
{data_dir}/mids/{mid}/member.json      the member's choices: paused, left, strikes (edge.agent.controls.state, 0600)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from edge.durable_file import replace_file
from protocol.enrolment import BrokerCredentials
from protocol.identity import SignerKey, VerifierKey, load_signer_key
from protocol.private_files import private_dir
from protocol.topics import check_id

MAX_MEMBERSHIP_FILE = 64 * 1024
FLOWER_KEY_DIR = "flower"
MEMBERSHIP_FILE = "membership.json"
OUTBOX_FILE = "outbox.sqlite"


class MembershipRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    mid: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    device: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    member: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    mid_key: str
    enrolment_url: str
    broker: BrokerCredentials
    enrolled_ms: int
    flower_node_id: int = 0
    """The SuperLink's node id for this device's Flower key; 0: the MID runs no SuperLink."""
    superlink: str = ""
    superlink_ca_pem: str = ""


class Membership:
    """A loaded membership: the record, the device key and the MID's verifier key."""

    def __init__(self, directory: Path, record: MembershipRecord, key: SignerKey) -> None:
        self.directory = directory
        self.record = record
        self.key = key
        self.mid_key = VerifierKey.parse(record.mid_key)

    @property
    def mid(self) -> str:
        return self.record.mid

    @property
    def device(self) -> str:
        return self.record.device

    @property
    def ca_file(self) -> Path | None:
        path = self.directory / "ca.pem"
        return path if self.record.broker.tls else None

    @property
    def flower_key_dir(self) -> Path:
        return self.directory / FLOWER_KEY_DIR

    @property
    def superlink_ca_file(self) -> Path | None:
        path = self.directory / "superlink-ca.pem"
        return path if self.record.flower_node_id else None

    @property
    def outbox_path(self) -> Path:
        return self.directory / OUTBOX_FILE


def save_membership(directory: Path, record: MembershipRecord) -> None:
    """Write the record 0600 and atomically; the CA next to it when the broker uses TLS."""
    private_dir(directory)
    if record.broker.tls:
        (directory / "ca.pem").write_text(record.broker.ca_pem)
    if record.flower_node_id:
        (directory / "superlink-ca.pem").write_text(record.superlink_ca_pem)
    replace_file(directory / MEMBERSHIP_FILE, record.model_dump_json(indent=2).encode())


def load_membership(directory: Path) -> Membership:
    path = directory / MEMBERSHIP_FILE
    if path.stat().st_size > MAX_MEMBERSHIP_FILE:
        raise ValueError(f"{path} is larger than {MAX_MEMBERSHIP_FILE} bytes")
    record = MembershipRecord.model_validate_json(path.read_bytes())
    return Membership(directory, record, load_signer_key(directory / "device.key"))


def load_memberships(mids_dir: Path) -> list[Membership]:
    """Every enrolled MID under `{data_dir}/mids`, sorted by MID id."""
    if not mids_dir.is_dir():
        return []
    found = []
    for child in sorted(mids_dir.iterdir()):
        if (child / MEMBERSHIP_FILE).is_file():
            check_id(child.name, "mid")
            found.append(load_membership(child))
    return found
