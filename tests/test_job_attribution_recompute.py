"""A member recomputes its JOB value from the ledger alone, job groups included (issue 17): the job's valuations go
through the real path (the account, outcome.json's record, `serve`'s JOB and ROUND leaves in a real SQLite ledger),
then `midgate ledger recompute-job` redoes the JOB leaf's attribution from the ROUND leaves (protocol/
job_attribution.py) and exits 0, or 1 naming the first difference when a logged similarity or value was changed.
Leaves logged before the evidence fields existed keep decoding in their canonical bytes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.attribution import AttributionAccount, RoundValuation, ScreenSettings, ValuationMethod
from coordinator.attribution.history import same_data_rules
from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate, RoundCapture
from coordinator.federation.job import JobOutcome
from coordinator.federation.job_ledger import job_log_records
from coordinator.federation.job_start import JobDevice, JobRecord, JobRequest
from coordinator.federation.server_app import record_valuations
from coordinator.ledger.store import LedgerStore
from midgate_cli import app as midgate
from protocol.errors import MalformedError
from protocol.identity import SignerKey
from protocol.job_attribution import SameDataRules, check_job_attribution, recompute_job_attribution
from protocol.job_log import JobLogRecord, RoundLogRecord, decode_job_record, decode_round_record, model_version
from protocol.leaves import Leaf, LeafKind
from protocol.tasks.arrays import arrays_sha256

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is scripts, not an installed package
from planted_adversaries import ADVERSARIES, Job, SyntheticWorld

JOB_ID = "job-7"
RUN = 5
NOW_MS = 1_795_000_000_000
FINAL_SHA = "ab" * 32
# Leaves as the code before the evidence fields encoded them (built at commit 0471ed8): byte for byte.
OLD_JOB_LEAF = (
    b'{"attribution":[{"excluded_rounds":0,"member":"ann","rounds":1,"screens":[],"value_units":5}],"buyer":"b",'
    b'"devices":[{"device":"d-a","member":"ann","node_id":"11","selected":true}],"ended_ms":1795000060000,'
    b'"final_model_sha256":null,"final_validation":{},"job_id":"job-7","model_version":null,"purpose":"p",'
    b'"reason":"","rounds":2,"rounds_completed":2,"run_id":"5","schema_id":"midgate.job.v1",'
    b'"started_ms":1795000000000,"status":"completed","task_id":"t","task_version":1}'
)
OLD_ROUND_LEAF = (
    b'{"drops":[],"global_sha256":"' + b"ab" * 32 + b'","job_id":"job-7","round":1,"run_id":"5",'
    b'"schema_id":"midgate.round.v1","skipped":"","updates":[{"device":"d-a","examples_reported":4,'
    b'"excluded":false,"member":"ann","node_id":"11","screens":[],"update_sha256":"' + b"cd" * 32 + b'",'
    b'"value_units":5}],"valuation":"exact"}'
)
Tamper = Callable[[JobLogRecord, list[RoundLogRecord]], tuple[JobLogRecord, list[RoundLogRecord]]]


def _renamed(valuation: RoundValuation, names: dict[str, str]) -> RoundValuation:
    """The same round with members named by `names` (the ServerApp's players are Flower node ids)."""
    return replace(
        valuation,
        values={names[m]: v for m, v in valuation.values.items()},
        standard_errors={names[m]: v for m, v in valuation.standard_errors.items()},
        flags={names[m]: f for m, f in valuation.flags.items()},
        players=[tuple(names[m] for m in player) for player in valuation.players],
        weights={names[m]: w for m, w in valuation.weights.items()},
        similarities={
            (min(names[a], names[b]), max(names[a], names[b])): s for (a, b), s in valuation.similarities.items()
        },
    )


def _capture(jobs_dir: Path, valuation: RoundValuation) -> None:
    global_arrays = {"w": np.zeros(3, dtype=np.float32)}
    updates = []
    for node in sorted(int(n) for n in valuation.values):
        arrays = {"w": np.full(3, node + valuation.round_index, dtype=np.float32)}
        updates.append(
            CapturedUpdate(
                valuation.round_index, node, arrays, arrays_sha256(arrays), arrays_sha256(global_arrays), 40, 1, {}
            )
        )
    capture = RoundCapture(RUN, valuation.round_index, arrays_sha256(global_arrays), tuple(updates), ())
    CaptureDirectory(jobs_dir / f"run-{RUN}").on_round(capture)


def logged_job(
    tmp_path: Path, valuations: Sequence[RoundValuation], member_of: dict[int, str], tamper: Tamper | None = None
) -> tuple[Path, JobLogRecord, list[RoundLogRecord]]:
    """The job's JOB and ROUND leaves as `serve` logs them from its outcome, in a real SQLite ledger (after
    `tamper`, when given: a MID that logged something else)."""
    account = AttributionAccount()
    for valuation in valuations:
        account.add(valuation)
    outcome = JobOutcome(run_id=RUN, status="finished", rounds_completed=len(valuations), final_model_sha256=FINAL_SHA)
    record_valuations(outcome, account, valuations)
    jobs_dir = tmp_path / "jobs"
    for valuation in valuations:
        _capture(jobs_dir, valuation)
    devices = [JobDevice(device_id=f"d-{node}", member_id=member, node_id=node) for node, member in member_of.items()]
    request = JobRequest(
        job_id=JOB_ID, task_id="plaid-appliance", task_version=1, rounds=len(valuations),
        validation_path=tmp_path / "validation.npz", purpose="research", buyer="acme", min_nodes=1,
    )  # fmt: skip
    record = JobRecord(
        request=request, invited=devices, nonces={d.device_id: "ab" * 16 for d in devices},
        selected_node_ids=sorted(member_of), run_id=RUN, status="completed", flower_status="finished:completed",
        rounds_completed=len(valuations), started_ms=NOW_MS, ended_ms=NOW_MS + 60_000, outcome=outcome,
        model_version=model_version(JOB_ID, FINAL_SHA),
    )  # fmt: skip
    job, rounds = job_log_records(record, jobs_dir)
    if tamper is not None:
        job, rounds = tamper(job, rounds)
    path = tmp_path / "ledger.sqlite"
    with LedgerStore.open(path, SignerKey.generate("midgate/test-mid")) as store:
        store.append_leaves(
            [Leaf(LeafKind.JOB, job.canonical_json())] + [Leaf(LeafKind.ROUND, r.canonical_json()) for r in rounds]
        )
    return path, job, rounds


def recompute_job(path: Path) -> tuple[int, str]:
    """`midgate ledger recompute-job`, as the console script mounts it: exit code and output."""
    result = CliRunner().invoke(midgate, ["ledger", "recompute-job", JOB_ID, "--db", str(path)])
    return result.exit_code, result.output


# --- A planted same-data pair, valued by the real screens ----------------------------------------------------------


@pytest.fixture(scope="module")
def planted() -> tuple[list[RoundValuation], dict[int, str]]:
    """Six honest members and a node re-training the first one's data (then noise), valued by the real screens
    (bench/planted_adversaries.py); nodes 11-17, and member ann holds two of them."""
    world = SyntheticWorld(classes=12, classes_per_member=2, seed=0)
    data = world.member_data((20, 30, 12, 25, 18, 22), 0)
    result = Job(world, data, 4, 0, ADVERSARIES["re-seeded then noise"]).run()
    names = {f"m{i:03d}": str(11 + i) for i in range(6)} | {"adversary": "17"}
    member_of = {11: "vic", 12: "ann", 13: "ann", 14: "bob", 15: "cid", 16: "dan", 17: "syb"}
    return [_renamed(v, names) for v in result.valuations], member_of


def test_a_job_with_a_same_data_group_recomputes_from_its_round_leaves_with_the_ledger_command(
    tmp_path: Path, planted: tuple[list[RoundValuation], dict[int, str]]
) -> None:
    valuations, member_of = planted
    path, job, rounds = logged_job(tmp_path, valuations, member_of)
    # The JOB leaf names the group; the ROUND leaves hold what it was found from.
    assert [(g.nodes, g.members, g.rounds) for g in job.job_groups] == [((11, 17), ("vic", "syb"), (1, 2))]
    assert [r.groups for r in rounds] == [((11, 17),), ((11, 17),), (), ()]
    assert [p.nodes for p in rounds[0].same_data] == [(11, 17)] and rounds[0].same_data[0].similarity_milli >= 500
    recomputed = recompute_job_attribution(job, rounds)
    assert recomputed.members == {m.member: (m.value_units, m.rounds, m.excluded_rounds) for m in job.attribution}
    assert recomputed.members["ann"][1] == 8  # two devices, four rounds: one payee
    assert recompute_job(path) == (0, "ok\n" + f"leaf 0: job {JOB_ID}'s attribution (6 members, 1 job groups)"
                                   " reproduces from its 4 rounds' ROUND leaves\n")  # fmt: skip


def test_a_changed_similarity_or_value_in_the_ledger_fails_the_command(
    tmp_path: Path, planted: tuple[list[RoundValuation], dict[int, str]]
) -> None:
    valuations, member_of = planted

    def weaker_evidence(job: JobLogRecord, rounds: list[RoundLogRecord]) -> tuple[JobLogRecord, list[RoundLogRecord]]:
        # Both rounds' similarity logged at 0.46: the CUSUM of the logged rounds no longer reaches the threshold.
        weak = [r.model_copy(update={"same_data": (r.same_data[0].model_copy(update={"similarity_milli": 460}),)})
                for r in rounds[:2]]  # fmt: skip
        return job, [*weak, *rounds[2:]]

    def richer_member(job: JobLogRecord, rounds: list[RoundLogRecord]) -> tuple[JobLogRecord, list[RoundLogRecord]]:
        bob = next(m for m in job.attribution if m.member == "bob")
        raised = bob.model_copy(update={"value_units": bob.value_units + 1})
        return job.model_copy(update={"attribution": tuple(raised if m is bob else m for m in job.attribution)}), rounds

    for name, tamper, expected in (
        ("similarity", weaker_evidence, "job group (11, 17)"),
        ("value", richer_member, "member bob"),
    ):
        (tmp_path / name).mkdir()
        path, _, _ = logged_job(tmp_path / name, valuations, member_of, tamper)
        code, output = recompute_job(path)
        assert code == 1, output
        assert "invalid: settlement_mismatch" in output and expected in output, output


# --- A pair two players in a round, paid there as one member by the job's evidence -----------------------------


def _round(index: int, values: dict[str, float], similarity: float, grouped: bool) -> RoundValuation:
    pair = [("11", "12")] if grouped else [("11",), ("12",)]
    return RoundValuation(
        round_index=index, method=ValuationMethod.EXACT, values=values, standard_errors=dict.fromkeys(values, 0.0),
        flags={}, players=[*pair, ("13",), ("14",)], evaluations=0, grand_utility=sum(values.values()),
        base_loss=1.0, similarities={("11", "12"): similarity},
    )  # fmt: skip


def _pair_job(
    tmp_path: Path, round_1: tuple[float, float]
) -> tuple[Path, JobLogRecord, list[RoundLogRecord], dict[int, str]]:
    """PLAID, seed 2: the pair (nodes 11 and 12) at 0.49 in round 1 (two players valued `round_1`), then 0.71, 0.61,
    0.67 (one player), logged through the real path."""
    values = [round_1, (0.1, 0.1), (0.05, 0.05), (0.05, 0.05)]
    valuations = [
        _round(t, {"11": a, "12": b, "13": 0.2, "14": 0.2}, s, s >= 0.5)
        for t, ((a, b), s) in enumerate(zip(values, [0.49, 0.71, 0.61, 0.67], strict=True), start=1)
    ]
    member_of = {11: "vic", 12: "syb", 13: "ann", 14: "bob"}
    path, job, rounds = logged_job(tmp_path, valuations, member_of)
    return path, job, rounds, member_of


def logged_before_the_rule(job: JobLogRecord, rounds: Sequence[RoundLogRecord]) -> JobLogRecord:
    """`job` as a MID logged it before JOB leaves named their rule: no `same_data_kept`, and the attribution its
    ROUND leaves give keeping the larger value of a linked pair's two players."""
    larger = recompute_job_attribution(job, rounds, SameDataRules(kept="larger")).members
    attribution = tuple(m.model_copy(update={"value_units": larger[m.member][0]}) for m in job.attribution)
    return job.model_copy(update={"same_data_kept": None, "attribution": attribution})


def test_a_round_paid_as_one_member_only_by_the_job_evidence_recomputes_exactly(tmp_path: Path) -> None:
    # Round 1 pays the pair 0.3.
    path, job, rounds, member_of = _pair_job(tmp_path, (0.3, 0.3))
    logged = {m.member: m.value_units for m in job.attribution}
    as_valued = {member_of[u.node_id]: 0 for r in rounds for u in r.updates}
    for r in rounds:
        for u in r.updates:
            as_valued[member_of[u.node_id]] += u.value_units or 0
    # Round 1's 0.6 of the pair is 0.3 once the job shows the same data: the JOB leaf is not the rounds' sum...
    assert logged["vic"] + logged["syb"] == as_valued["vic"] + as_valued["syb"] - 300_000_000
    assert [(g.nodes, g.rounds) for g in job.job_groups] == [((11, 12), (1, 2, 3, 4))]
    # ...and still what the ROUND leaves give, to the unit.
    assert check_job_attribution(job, rounds) is None
    assert recompute_job(path)[0] == 0
    # A MID leaving the pair's similarities of rounds 2-4 out of their leaves would have paid round 1 twice.
    changed = [rounds[0], *(r.model_copy(update={"same_data": ()}) for r in rounds[1:])]
    assert recompute_job_attribution(job, changed).members["syb"][0] == logged["syb"] + 150_000_000
    assert (check_job_attribution(job, changed) or "").startswith("member syb")


def test_the_job_leaf_names_its_rule_and_a_leaf_from_before_it_recomputes_by_the_larger_value(tmp_path: Path) -> None:
    # Round 1's two players valued 0.3 and 0.2: paid as one member, the pair keeps 0.2 there.
    path, job, rounds, _ = _pair_job(tmp_path, (0.3, 0.2))
    assert job.same_data_kept == "smaller" and b'"same_data_kept":"smaller"' in job.canonical_json()
    logged = {m.member: m.value_units for m in job.attribution}
    assert logged["vic"] + logged["syb"] == 200_000_000 + 400_000_000
    assert recompute_job(path)[0] == 0
    # A leaf from before the rule was named was settled keeping the larger value, and recomputes so.
    old = logged_before_the_rule(job, rounds)
    assert {m.member: m.value_units for m in old.attribution}.keys() == logged.keys()
    assert sum(m.value_units for m in old.attribution if m.member in ("vic", "syb")) == 300_000_000 + 400_000_000
    assert b"same_data_kept" not in old.canonical_json() and old.kept() == "larger"
    assert check_job_attribution(old, rounds) is None
    # The rule is part of what the leaf proves: the same values under the other rule are a difference.
    assert (check_job_attribution(job.model_copy(update={"same_data_kept": None}), rounds) or "").startswith("member")
    assert (check_job_attribution(old.model_copy(update={"same_data_kept": "smaller"}), rounds) or "").startswith(
        "member"
    )


# --- Formats -----------------------------------------------------------------------------------------------------


def test_leaves_from_before_the_evidence_fields_decode_in_their_bytes() -> None:
    assert decode_job_record(OLD_JOB_LEAF).canonical_json() == OLD_JOB_LEAF
    assert decode_round_record(OLD_ROUND_LEAF).canonical_json() == OLD_ROUND_LEAF
    assert decode_job_record(OLD_JOB_LEAF).job_groups == () and decode_round_record(OLD_ROUND_LEAF).same_data == ()
    # Empty evidence is left out, never written as an empty list: one encoding per record.
    for leaf, field in ((OLD_ROUND_LEAF, b'"groups":[],'), (OLD_ROUND_LEAF, b'"same_data":[],')):
        with pytest.raises(MalformedError, match="canonical"):
            decode_round_record(leaf.replace(b'"global_sha256"', field + b'"global_sha256"'))
    with pytest.raises(MalformedError, match="canonical"):
        decode_job_record(OLD_JOB_LEAF.replace(b'"job_id"', b'"job_groups":[],"job_id"'))


@pytest.mark.parametrize(
    "evidence",
    [
        b',"same_data":[{"nodes":["17","11"],"similarity_milli":900}]',  # smaller node first
        b',"same_data":[{"nodes":["11","17"],"similarity_milli":900}]',  # node 17 sent no update this round
        b',"same_data":[{"nodes":["11","11"],"similarity_milli":900}]',
    ],
)
def test_a_logged_pair_names_two_of_the_round_s_nodes_smaller_first(evidence: bytes) -> None:
    with pytest.raises(MalformedError):
        decode_round_record(OLD_ROUND_LEAF.replace(b',"schema_id"', evidence + b',"schema_id"'))


def test_a_logged_group_names_admitted_nodes() -> None:
    with pytest.raises(MalformedError):
        decode_round_record(OLD_ROUND_LEAF.replace(b'"global_sha256"', b'"groups":[["11","17"]],"global_sha256"'))


def test_the_ledger_check_runs_the_screens_default_thresholds() -> None:
    assert same_data_rules(ScreenSettings()) == SameDataRules()
