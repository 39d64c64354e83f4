"""The MID's policy document (`MidPolicy`) and the TOML file it is read from.

The file is the operator's whole policy, in one place (README, "The MID's policy"):

    fee_bps = 1500                      # the MID's fee, at most 3000 (30 %): a higher fee refuses the file
    majority_excluded_earns_nothing = false
    data_free_earns_nothing = true
    [knob]                              # price = clamp(base * exp(alpha * knob), min, max), knob in [-1, +1]
    base_price_minor = 1000
    alpha_milli = 693
    min_price_minor = 100
    max_price_minor = 100000
    [reputation]
    min_milli = { default = 0, health = 500 }   # a job class's minimum member reputation (milli-units)
    [strikes]
    quorum_bps = 5000                   # share of the MID's members whose signed strike stops sales to a target
    min_members = 3
    running_jobs = "finish"             # or "stop": what a strike at quorum does to the target's running jobs
    [leave]
    royalties_continue = true           # a member who leaves keeps earning from models already trained
    notice_days = 0                     # with royalties_continue = false: days its royalties still flow
    [[purposes]]                        # the purposes a buyer may name, as W3C DPV concepts, with licence terms
    code = "research"
    dpv = "dpv:ResearchAndDevelopment"
    label = "Research and development"
    licence = "..."

What identifies a policy is the SHA-256 of its canonical JSON (`content_sha256`), not the file's bytes: a comment or a
reordering is no change, and logs no leaf. With no file, the policy is the `[royalties]` table of coordinator.toml
with the defaults below for the rest (`from_royalty_settings`).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from coordinator.config import CoordinatorSettings
from coordinator.royalties.policy import MAX_FEE_BPS, KnobPolicy, RoyaltyPolicy
from protocol.errors import MalformedError, PolicyViolationError, TooLargeError

MAX_POLICY_FILE_BYTES = 256 * 1024
Code = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Text = Annotated[str, StringConstraints(max_length=256)]
Licence = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
DEFAULT_JOB_CLASS = "default"


class Purpose(BaseModel):
    """A purpose a buyer may train for: its code (what a job names), the W3C Data Privacy Vocabulary concept it is
    (https://w3id.org/dpv, e.g. `dpv:ScientificResearch`), a label, and the licence terms a model trained for it is
    delivered under (they go into its provenance manifest)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    code: Code
    dpv: Annotated[str, StringConstraints(pattern=r"^(dpv[a-z-]*:[A-Za-z][A-Za-z0-9]*|https://[\x21-\x7e]{1,200})$")]
    label: Text
    licence: Licence


class ReputationPolicy(BaseModel):
    """Minimum member reputation (milli-units, coordinator.attribution.reputation) per job class; a class not
    listed takes `default`'s."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    min_milli: dict[Code, Annotated[int, Field(ge=0, le=1_000_000)]] = Field(
        default_factory=lambda: {DEFAULT_JOB_CLASS: 0}, max_length=64
    )

    @model_validator(mode="after")
    def _has_default(self) -> Self:
        if DEFAULT_JOB_CLASS not in self.min_milli:
            raise ValueError(f"[reputation] min_milli needs a '{DEFAULT_JOB_CLASS}' entry")
        return self


class StrikePolicy(BaseModel):
    """When members' signed strikes stop sales to a target: at least `quorum_bps` of the MID's members, and at
    least `min_members` of them; and what a strike reaching its quorum does to the target's jobs already running."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    quorum_bps: int = Field(default=5000, ge=1, le=10_000)
    min_members: int = Field(default=3, ge=1)
    running_jobs: Literal["finish", "stop"] = "finish"
    """`finish`: a job of the target already running when the strike reaches its quorum runs to its end (the buyer
    paid for it before the strike). `stop`: the job's run is stopped within seconds and the job ends failed with
    reason `strike` (it is not settled: a failed job's escrow is refunded). A job takes the policy in force when it
    started."""


class LeaveDefaults(BaseModel):
    """What a member's departure means for the royalties of models it helped train (README, "Leaving").

    Leaving itself always takes effect at once: the member's keys and broker login are revoked and it is never
    invited again when its LeaveNotice is logged (its own agent declines every invitation from then on anyway, and
    keeping a leaving member's keys alive against its signed wish would serve nobody). The terms below travel with
    each job's settlement (RoyaltyPolicy), so a member keeps the terms its models were trained under."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    royalties_continue: bool = True
    """Revenue from models already trained keeps flowing to the member after it left (attribution is kept in the
    log). False: revenue reported more than `notice_days` after the leave was logged pays the member nothing; its
    share goes to the model's other members (the MID's fee does not grow)."""
    notice_days: int = Field(default=0, ge=0, le=365)
    """Days after a member's leave is logged during which its royalties still flow when `royalties_continue` is
    false; no effect when royalties continue."""


DEFAULT_PURPOSES: tuple[Purpose, ...] = (
    Purpose(
        code="research",
        dpv="dpv:ResearchAndDevelopment",
        label="Research and development",
        licence="Use for research and development of the buyer's products only; no resale of the model; no "
        "re-identification of members; revenue from the model is reported to the MID.",
    ),
    Purpose(
        code="health-research",
        dpv="dpv:ScientificResearch",
        label="Scientific (health) research",
        licence="Use for scientific research only; results may be published; no commercial use of the model "
        "without a new job; no re-identification of members.",
    ),
    Purpose(
        code="service-optimisation",
        dpv="dpv:ServiceOptimisation",
        label="Optimisation of the buyer's service",
        licence="Use to operate and improve the buyer's own service; no resale of the model; revenue from the "
        "model is reported to the MID.",
    ),
    Purpose(
        code="ads",
        dpv="dpv:Advertising",
        label="Advertising",
        licence="Use for advertising the buyer's own products only; no profiling of individual members; revenue "
        "from the model is reported to the MID.",
    ),
)


class MidPolicy(BaseModel):
    """The MID's whole policy (module docstring). Frozen; a fee above 30 % cannot be constructed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    fee_bps: int = Field(ge=0)
    knob: KnobPolicy
    majority_excluded_earns_nothing: bool = False
    data_free_earns_nothing: bool = True
    reputation: ReputationPolicy = Field(default_factory=ReputationPolicy)
    strikes: StrikePolicy = Field(default_factory=StrikePolicy)
    leave: LeaveDefaults = Field(default_factory=LeaveDefaults)
    purposes: list[Purpose] = Field(default_factory=lambda: list(DEFAULT_PURPOSES), min_length=1, max_length=256)

    @model_validator(mode="after")
    def _within_policy(self) -> Self:
        if self.fee_bps > MAX_FEE_BPS:
            raise PolicyViolationError(
                "MID fee above the 30 % cap (members keep at least 70 % of every payment)",
                fee_bps=self.fee_bps,
                max_fee_bps=MAX_FEE_BPS,
            )
        codes = [p.code for p in self.purposes]
        if len(set(codes)) != len(codes):
            raise PolicyViolationError("purpose codes must be unique", codes=codes)
        return self

    def canonical_json(self) -> bytes:
        """Sorted keys, no whitespace: what `content_sha256` hashes and a POLICY leaf records."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    def content_sha256(self) -> str:
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def royalty(self, version: int) -> RoyaltyPolicy:
        """The money part, as settlement records carry it, under this policy's ledger `version`."""
        return RoyaltyPolicy(
            version=version,
            fee_bps=self.fee_bps,
            knob=self.knob,
            majority_excluded_earns_nothing=self.majority_excluded_earns_nothing,
            data_free_earns_nothing=self.data_free_earns_nothing,
            royalties_continue=self.leave.royalties_continue,
            leave_notice_days=self.leave.notice_days,
        )

    def purpose(self, code: str) -> Purpose:
        """The vocabulary's entry for `code`; PolicyViolationError naming the known codes otherwise."""
        for purpose in self.purposes:
            if purpose.code == code:
                return purpose
        raise PolicyViolationError(
            "purpose not in the MID's vocabulary", purpose=code, known=[p.code for p in self.purposes]
        )

    def min_reputation_milli(self, job_class: str) -> int:
        table = self.reputation.min_milli
        return table.get(job_class, table[DEFAULT_JOB_CLASS])


def parse_policy(data: bytes, source: str = "policy file") -> MidPolicy:
    """A policy from TOML bytes: size first, then TOML, then the strict model. PolicyViolationError for a fee
    above the cap or duplicate purposes; MalformedError for anything else that is not a policy."""
    if len(data) > MAX_POLICY_FILE_BYTES:
        raise TooLargeError("policy file too large", limit=MAX_POLICY_FILE_BYTES, found=len(data))
    try:
        document: dict[str, Any] = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MalformedError(f"{source} is not TOML", error=str(exc)[:200]) from None
    try:
        return MidPolicy.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors(include_input=False)[:5]
        )
        raise MalformedError(f"{source} is not a MID policy: {problems}", errors=exc.error_count()) from None


def load_policy_file(path: Path) -> MidPolicy:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MalformedError("policy file cannot be read", path=str(path), error=exc.strerror) from None
    return parse_policy(data, str(path))


def configured_policy(settings: CoordinatorSettings) -> MidPolicy:
    """The policy in force by configuration: the policy file (`policy_file`, default data_dir/policy.toml when it
    exists), or `[royalties]` with the policy's defaults when there is none. Raises PolicyViolationError (fee above
    the cap) or MalformedError (not a policy, or a configured file that is missing)."""
    if settings.policy_path.exists() or settings.policy_file is not None:
        return load_policy_file(settings.policy_path)
    return from_royalty_settings(settings.royalties.policy())


def from_royalty_settings(royalty: RoyaltyPolicy) -> MidPolicy:
    """The policy of a MID without a policy file: its `[royalties]` money settings, the defaults for the rest."""
    return MidPolicy(
        fee_bps=royalty.fee_bps,
        knob=royalty.knob,
        majority_excluded_earns_nothing=royalty.majority_excluded_earns_nothing,
        data_free_earns_nothing=royalty.data_free_earns_nothing,
    )
