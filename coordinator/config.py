"""`coordinator.toml`: the MID operator's settings, one model, TOML + `MIDGATE_COORDINATOR_*` env overrides.

Example:

    mid = "riverside"
    data_dir = "/var/lib/midgate"
    [broker]
    host = "127.0.0.1"
    port = 8883
    tls = true
    [enrolment]
    port = 8443
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coordinator.royalties.policy import KnobPolicy, RoyaltyPolicy
from protocol.settings import RoleSettings

_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class BrokerSettings(BaseModel):
    """How the coordinator reaches its broker, and what devices are told to connect to."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="broker host the coordinator connects to")
    port: int = Field(default=1883, ge=1, le=65535, description="broker port the coordinator connects to")
    tls: bool = Field(default=False, description="connect with TLS (required outside the embedded demo)")
    ca_file: Path | None = Field(default=None, description="CA certificate that signed the broker's certificate")
    username: str = Field(default="coordinator", description="the coordinator's broker login")
    password_file: Path | None = Field(
        default=None, description="0600 file with the coordinator's broker password (written by `broker-config`)"
    )
    # Devices are told the broker's device-facing TLS listener, never the coordinator's own connection above: the
    # coordinator usually sits on the plain loopback listener, which devices cannot (and must not) use.
    public_host: str | None = Field(
        default=None,
        description="host of the broker's TLS listener named in every enrolment grant; default: the first of "
        "`broker_config.tls_hostnames` (a name in the broker's certificate)",
    )
    public_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="port of that listener, named in every enrolment grant; default `broker_config.tls_port`",
    )
    public_tls: bool = Field(
        default=True,
        description="grants tell devices to use TLS and trust the MID CA (`ca_file`, else the `tls/ca.crt` that "
        "`broker-config` writes); false only for loopback tests and demos, and then `public_port` is required",
    )
    pid_file: Path | None = Field(
        default=None,
        description="the broker's pid file, written into mosquitto.conf by `broker-config`; `serve` and `revoke` "
        "SIGHUP that pid after rewriting the logins; default `broker_config.output_dir/run/mosquitto.pid`",
    )
    client_id: str = Field(
        default="midgate-coordinator", description="MQTT client id of the coordinator's persistent session"
    )
    mqtt5: bool = Field(
        default=True, description="MQTT 5; false for 3.1.1-only brokers (persistent session with clean_session=0)"
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive in seconds")

    @model_validator(mode="after")
    def _plain_devices_name_their_port(self) -> Self:
        if not self.public_tls and self.public_port is None:
            raise ValueError("[broker] public_tls = false needs public_port: the TLS port is no plain listener")
        return self


class BrokerConfigSettings(BaseModel):
    """What `midgate coordinator broker-config` writes for Mosquitto."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Field(
        default=Path("broker"),
        description="folder for mosquitto.conf, logins, ACL, TLS, persistence, log, pid file and the systemd drop-in; "
        "keep it outside data_dir (the broker's user must be able to reach it)",
    )
    user: str = Field(
        default="mosquitto",
        description="account Mosquitto drops root to (`user` in mosquitto.conf); when `broker-config` runs as root, "
        "it owns the logins, ACL, TLS key, persistence, log and pid folders",
    )
    listen_host: str = Field(default="0.0.0.0", description="address of the TLS listener devices connect to")
    tls_port: int = Field(default=8883, ge=1, le=65535, description="port of the TLS listener")
    local_port: int | None = Field(
        default=1883,
        ge=1,
        le=65535,
        description="plain listener on loopback only (coordinator on the same host, hub bridge); none: off",
    )
    tls_hostnames: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1"],
        min_length=1,
        description="names in the broker's server certificate",
    )
    # Mosquitto's default of 1000 silently drops QoS 1 messages for a slow or offline subscriber (measured);
    # 200,000 queued reports is days of one device's output and well under a gigabyte.
    max_queued_messages: int = Field(
        default=200_000, ge=1000, description="QoS 1 messages the broker queues per offline client"
    )
    max_packet_size: int = Field(default=256 * 1024, ge=1024, description="largest MQTT packet the broker accepts")
    persistent_client_expiration: str = Field(
        default="30d", description="how long the broker keeps the session of a device that stays away"
    )
    autosave_interval_s: int = Field(
        default=60, ge=1, description="seconds between broker persistence saves (Mosquitto's default is 30 min)"
    )


class EnrolmentSettings(BaseModel):
    """The small HTTP endpoint that turns a signed invite into a device membership (TLS is terminated in front)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="serve the enrolment (and buyer) HTTP endpoint")
    host: str = Field(default="127.0.0.1", description="address of the HTTP endpoint (behind a TLS proxy)")
    port: int = Field(default=8480, ge=0, le=65535, description="port of the HTTP endpoint; 0 picks a free one")
    invite_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="how long a new invite stays valid")
    max_body_bytes: int = Field(default=16 * 1024, ge=1024, description="largest enrolment request accepted")


class IngestSettings(BaseModel):
    """Batching and bounds of the MQTT -> verify -> ledger -> receipt pipeline."""

    model_config = ConfigDict(extra="forbid")

    max_message_bytes: int = Field(
        default=64 * 1024, ge=1024, description="larger device messages are refused (too_large) before parsing"
    )
    batch_max: int = Field(default=500, ge=1, description="reports per ledger transaction at most")
    batch_window_ms: int = Field(default=10, ge=0, description="how long a batch waits to fill before it commits")
    # Our own bound on unacknowledged messages in memory; the broker may ignore the Receive Maximum we advertise.
    queue_max: int = Field(
        default=4000, ge=10, description="unacknowledged messages held in memory at most, whatever the broker sends"
    )
    receive_maximum: int = Field(
        default=2000, ge=1, le=65535, description="MQTT 5 Receive Maximum advertised to the broker"
    )
    rate_per_s: float = Field(default=50.0, gt=0, description="default per-device sustained reports per second")
    rate_burst: int = Field(default=2000, ge=1, description="default per-device burst (a device back from offline)")
    heartbeat_offline_s: int = Field(
        default=180, ge=10, description="a device without a heartbeat for this long counts as offline"
    )
    workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="screening workers (`midgate coordinator ingest-worker`); when > 0 `serve` only sequences what "
        "they hand over and no longer subscribes to the device topics itself",
    )
    worker_ids: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="screening worker ids that `broker-config` gives their own broker login `ingest.{id}` "
        "(password in data_dir/broker-worker-{id}.password) with an ACL limited to what a worker needs",
    )
    share_group: str = Field(default="ingest", pattern=_ID_PATTERN, description="MQTT 5 shared-subscription group")

    @field_validator("worker_ids")
    @classmethod
    def _worker_ids_are_ids(cls, ids: list[str]) -> list[str]:
        bad = [i for i in ids if not re.fullmatch(_ID_PATTERN, i)]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique and match {_ID_PATTERN}: {bad or ids}")
        return ids

    handoff_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a worker that gets no commit notice for a hand-off batch in this time has the broker redeliver "
        "the batch's messages (dedup answers what was committed)",
    )


class RoyaltySettings(BaseModel):
    """The MID's money policy (coordinator/royalties/policy.py); a fee above the 30 % cap refuses the whole config."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(
        default=1,
        ge=1,
        description="not read by `serve` any more: a policy's version is its POLICY leaf's, counted by the log "
        '(README, "The MID\'s policy"); kept so older configs load',
    )
    fee_bps: int = Field(default=1500, ge=0, description="MID fee in basis points of each payment, at most 3000 (30 %)")
    base_price_minor: int = Field(default=1000, ge=0, description="a member's price per job at knob 0 (minor units)")
    alpha_milli: int = Field(
        default=693, ge=0, le=5000, description="knob steepness in milli-units: 693 (ln 2) makes knob +1 ask 2x base"
    )
    min_price_minor: int = Field(default=100, ge=0, description="lowest price any knob setting yields (minor units)")
    max_price_minor: int = Field(default=100_000, ge=0, description="highest price any knob yields (minor units)")
    majority_excluded_earns_nothing: bool = Field(
        default=False,
        description="a member any screen excluded from more than half a job's rounds earns nothing from it (the rule "
        "before issue 17: it also takes the pay of an honest member a consensus screen excluded)",
    )
    data_free_earns_nothing: bool = Field(
        default=True,
        description="a member a data-free proof (zero, stale, random-weights or data-free screen) excluded from more "
        "than half a job's rounds earns nothing from it; others keep the value of their admitted rounds",
    )
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$", description="ISO 4217 code of every payment")

    @model_validator(mode="after")
    def _policy_holds(self) -> Self:
        self.policy()  # PolicyViolationError (fee cap, knob bounds) is not a ValueError: it leaves load() as is
        return self

    def policy(self) -> RoyaltyPolicy:
        knob = KnobPolicy(
            base_price_minor=self.base_price_minor,
            alpha_milli=self.alpha_milli,
            min_price_minor=self.min_price_minor,
            max_price_minor=self.max_price_minor,
        )
        return RoyaltyPolicy(
            version=self.version,
            fee_bps=self.fee_bps,
            knob=knob,
            majority_excluded_earns_nothing=self.majority_excluded_earns_nothing,
            data_free_earns_nothing=self.data_free_earns_nothing,
        )


class BuyerSettings(BaseModel):
    """AI buyers allowed to use the buyer HTTP API (revenue reports), by buyer id."""

    model_config = ConfigDict(extra="forbid")

    keys: dict[str, str] = Field(
        default_factory=dict,
        description="buyer id -> C2SP verifier key text (`midgate buyer keygen` prints it); others are refused",
    )
    max_body_bytes: int = Field(default=16 * 1024, ge=1024, description="largest revenue-report request accepted")


class MarketSettings(BaseModel):
    """Buyer jobs through the buyer API (docs/protocol.md, "Buyer jobs"): buyers are registered with
    `midgate coordinator buyer add`; jobs run on the MID's SuperLink (`[federation] enabled`)."""

    model_config = ConfigDict(extra="forbid")

    quote_ttl_s: float = Field(default=900.0, gt=0, le=86_400, description="how long a quote can be accepted")
    max_validation_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="largest validation data upload accepted"
    )
    dp_clipping_norm: float = Field(default=1.0, gt=0, description="client-side clipping norm of a `dp_required` job")
    dp_noise_multiplier: float = Field(
        default=0.5, gt=0, description="Gaussian noise multiplier of a `dp_required` job"
    )
    join_timeout_s: float = Field(default=60.0, gt=0, description="seconds a buyer job waits for its devices to join")
    round_timeout_s: float = Field(default=120.0, gt=0, description="seconds a buyer job waits for a round's replies")
    settle_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="after this long without its SETTLEMENT leaf a completed buyer job's status says it is late "
        "(serve keeps waiting)",
    )


class WitnessSettings(BaseModel):
    """Members' agents as the log's witnesses (docs/ledger.md, "Witnesses"): how many cosignatures make a checkpoint
    witnessed, the one members' statements and receipts are verified against."""

    model_config = ConfigDict(extra="forbid")

    quorum_max: int = Field(
        default=3,
        ge=1,
        le=32,
        description="a checkpoint is witnessed when a majority of the enrolled, unrevoked devices cosigned it, but at "
        "most this many are required",
    )


class DashboardSettings(BaseModel):
    """The operator dashboard under `/operator` on the HTTP endpoint (coordinator/dashboard), behind the operator's
    password (`midgate coordinator operator passwd`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="serve the operator dashboard beside the HTTP API")
    session_ttl_s: int = Field(
        default=8 * 3600, ge=60, le=30 * 24 * 3600, description="how long an operator login lasts, seconds"
    )
    secure_cookie: bool = Field(
        default=True,
        description="send the session cookie only over HTTPS (the TLS proxy in front); browsers also send it to "
        "http://localhost and 127.0.0.1. False only for plain-HTTP tests",
    )


class FederationSettings(BaseModel):
    """The MID's Flower SuperLink, run by `serve` (TLS with the MID CA, SuperNode authentication, telemetry off)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="`serve` also runs the MID's Flower SuperLink")
    host: str = Field(default="127.0.0.1", description="address devices' SuperNodes connect to")
    port: int = Field(default=9093, ge=1, le=65535, description="port devices' SuperNodes connect to")
    flower_acceleration: bool = Field(
        default=True,
        description="the workarounds for Flower internals that shorten a round (coordinator.federation.acceleration: "
        "0.1 s reply poll, packed arrays, prompt object pulls in every job `job start` runs; the fleet front holding "
        'empty pulls). False: Flower\'s own grid and an unholding front (docs/federated.md, "Flower acceleration")',
    )
    one_player_per_member: bool = Field(
        default=True,
        description="with attribution, a member's devices in a job are one player: their updates add up (those "
        "alike by their data combined first), no longer than the longest of them or the typical update, and the "
        "member is paid once for them (a second device training the member's data again earns about nothing, "
        "however much noise it adds; a member holding more than the typical data over several devices is valued at "
        "the typical length). False: every device is a player of its own (docs/attribution.md, section 3)",
    )
    fleet_front: bool = Field(
        default=True,
        description="devices reach only the SuperLink's Fleet API, through the fleet front on host:port "
        "(coordinator.federation.fleet_front), which with flower_acceleration also holds a device's empty pull until "
        "its next message; the SuperLink itself listens on 127.0.0.1:superlink_port. False: the SuperLink listens on "
        "host:port, all its APIs",
    )
    superlink_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="the SuperLink's own port on 127.0.0.1 behind the fleet front; 0 picks a free one. `serve` "
        "writes the address to federation/superlink-address, where `job start` reads it",
    )
    fleet_hold_s: float = Field(
        default=5.0,
        ge=0,
        le=25,
        description="how long the fleet front holds a device's pull that found no message (with flower_acceleration; "
        "0: no holding)",
    )
    keep_warm_serverapp: bool = Field(
        default=True,
        description="with flower_acceleration: `serve` keeps a warm parent beside the SuperLink "
        "(coordinator.federation.warm_serverapp: Flower's ServerApp entry point, torch and midgate's ServerApp "
        "imported; about 350 MB resident) from which each job's `flwr-serverapp` is forked instead of started fresh "
        "(5 s of CPU per job measured); if it is not up or fails, the ServerApp starts the ordinary way. False: every "
        "job's ServerApp is a fresh process",
    )
    public_host: str | None = Field(default=None, description="host devices' SuperNodes connect to; defaults to `host`")
    tls_hostnames: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1"], description="names in the SuperLink's server certificate"
    )
    start_timeout_s: float = Field(default=60.0, gt=0, description="how long `serve` waits for the SuperLink to listen")
    jobs_dir: Path | None = Field(
        default=None,
        description="the jobs' `output-dir`: round captures under `run-<id>/`, against which every contribution "
        "report is cross-checked; default data_dir/federation/jobs",
    )
    # A device reports right after replying to Flower, so its report usually arrives before the strategy has the
    # whole round and writes the capture; a round lasts at most join + round timeout (180 s by default).
    report_grace_s: float = Field(
        default=900.0,
        gt=0,
        description="how long a contribution report waits for its round's capture before it is refused "
        "(round_not_captured)",
    )
    capture_poll_s: float = Field(
        default=0.5, gt=0, le=60, description="seconds between looks for the captures that waiting reports need"
    )


class CoordinatorSettings(RoleSettings):
    """The MID's coordinator: its identity and data folder, broker, enrolment endpoint, ingest, money policy."""

    ENV_PREFIX = "MIDGATE_COORDINATOR_"

    mid: str = Field(
        default="demo",
        pattern=_ID_PATTERN,
        description="the MID's id in topics; its log's origin (and MID key name) is midgate/{mid}",
    )
    data_dir: Path = Field(
        default=Path("coordinator-data"), description="MID key, registry, ledger; keep it private to the service"
    )
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    broker_config: BrokerConfigSettings = Field(default_factory=BrokerConfigSettings)
    enrolment: EnrolmentSettings = Field(default_factory=EnrolmentSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    royalties: RoyaltySettings = Field(default_factory=RoyaltySettings)
    buyers: BuyerSettings = Field(default_factory=BuyerSettings)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    witnesses: WitnessSettings = Field(default_factory=WitnessSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    market: MarketSettings = Field(default_factory=MarketSettings)
    policy_file: Path | None = Field(
        default=None,
        description="the MID's policy, one TOML file (README, \"The MID's policy\"): fee, knob curve, reputation "
        "minimums, strike quorum, purpose vocabulary, leave defaults; `serve` logs every change as a POLICY leaf. "
        "Default data_dir/policy.toml when it exists, else `[royalties]` with the policy's defaults",
    )
    log_json: bool = Field(default=True, description="structured JSON logs (false: plain text)")

    @property
    def policy_path(self) -> Path:
        """Where the MID's policy file is (`policy_file`, default data_dir/policy.toml); `policy apply` installs
        a file there."""
        return self.policy_file or self.data_dir / "policy.toml"

    @property
    def manifests_dir(self) -> Path:
        """The provenance manifests the MID issued, one per job (coordinator.provenance.shelf)."""
        return self.data_dir / "manifests"

    @property
    def mid_key_file(self) -> Path:
        return self.data_dir / "mid.key"

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.sqlite"

    @property
    def tasks_path(self) -> Path:
        """The task catalogue (coordinator.tasks): the specs the operator approved, signed with the MID key."""
        return self.data_dir / "tasks.sqlite"

    @property
    def market_path(self) -> Path:
        """Registered buyers, their request nonces and their jobs (coordinator.market.store)."""
        return self.data_dir / "market.sqlite"

    @property
    def ingest_path(self) -> Path:
        return self.data_dir / "ingest.sqlite"

    @property
    def handoff_key_path(self) -> Path:
        """HMAC key shared by `serve` and its screening workers (0600; copy it to workers on other hosts)."""
        return self.data_dir / "ingest-handoff.key"

    @property
    def federation_dir(self) -> Path:
        """The SuperLink's FLWR_HOME and database, and the `flwr` CLI's own FLWR_HOME beside it."""
        return self.data_dir / "federation"

    @property
    def jobs_dir(self) -> Path:
        """Where the jobs' round captures are (`[federation] jobs_dir`)."""
        return self.federation.jobs_dir or self.federation_dir / "jobs"

    @property
    def job_book_dir(self) -> Path:
        """`job start`'s record of every job, `<job id>.json` (JobBook); ingest reads the invitation nonces there."""
        return self.federation_dir / "job-book"

    @property
    def contributions_path(self) -> Path:
        """Contribution reports waiting for their round's capture, and refused reports kept as evidence."""
        return self.data_dir / "contributions.sqlite"

    @property
    def ledger_path(self) -> Path:
        """The MID's log (`serve` is its one writer; commands read it with LedgerReader)."""
        return self.data_dir / "ledger.sqlite"

    @property
    def operator_password_path(self) -> Path:
        """The operator's dashboard password, scrypt-hashed (0600; `midgate coordinator operator passwd`)."""
        return self.data_dir / "operator-password"

    @property
    def ledger_dir(self) -> Path:
        return self.data_dir / "ledger"

    @classmethod
    def load_for_command(cls, path: Path | None) -> CoordinatorSettings:
        """The settings a command runs with; an invalid config (e.g. policy_violation: a fee above the 30 % cap) ends
        the command with one line on stderr and exit code 2, and nothing starts."""
        import typer

        from protocol.errors import ProtocolError

        try:
            return cls.load(path)
        except ProtocolError as error:
            typer.echo(f"invalid config: {error}", err=True)
            raise typer.Exit(2) from None
