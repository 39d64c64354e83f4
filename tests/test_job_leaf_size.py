"""A job of many members fits the ledger's leaves: a round too large for one ROUND leaf is logged in parts that join
back into the round (protocol/job_log.py `split_round_record`, `join_round_parts`), and a data set's copies are one
job group set in the JOB leaf, not every pair of them. Found at 1,000 members holding 50 data sets (BENCHMARKS.md,
issue 17's fifth pass): the round's record was 1,049,386 bytes against a leaf's 1,048,576, and the job's 9,500 job
groups made its JOB leaf about 1.4 MB, so `serve` refused to log the job and it was never settled.

Here the job runs the path `serve` and the commands run after a job: `serve`'s follower of the job book logs it,
`job settle` waits for its settlement, `midgate ledger recompute-job` redoes its attribution from the leaves, and the
dashboard's digest reads its rounds back."""

from __future__ import annotations

import random
import threading
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate, DropReason, NodeDrop, RoundCapture
from coordinator.config import RoyaltySettings
from coordinator.dashboard.ledger_digest import LedgerDigest
from coordinator.federation.job import JobGroup, JobOutcome, NodeHistory, RoundAttribution, SameDataSimilarity
from coordinator.federation.job_cli import app as job_app
from coordinator.federation.job_ledger import JobLedger
from coordinator.federation.job_start import (
    JobBook,
    JobDevice,
    JobRecord,
    JobRequest,
    JobRequestError,
    check_job_leaf_room,
)
from coordinator.ledger.store import LedgerReader, LedgerStore
from midgate_cli import app as midgate
from protocol.errors import MalformedError, TooLargeError
from protocol.identity import SignerKey
from protocol.job_log import (
    JobDeviceEntry,
    JobGroupEntry,
    JobGroupSet,
    JobLogRecord,
    RoundDropEntry,
    RoundLogRecord,
    RoundSameDataPair,
    RoundUpdateEntry,
    decode_job_record,
    decode_round_record,
    join_round_parts,
    model_version,
    split_round_record,
)
from protocol.leaves import MAX_SIGNED_SIZE, LeafKind, decode_leaf
from protocol.tasks.arrays import arrays_sha256

NOW_MS = 1_795_000_000_000
RUN = 9
JOB = "job-many"
FINAL_SHA = "cd" * 32
NODE0 = 10**19  # Flower's node ids are 64-bit: 20 digits, the longest a leaf names
COPIES = 20


def _node(i: int) -> int:
    return NODE0 + 7919 * i


def _update(i: int, node: int) -> RoundUpdateEntry:
    return RoundUpdateEntry(
        device=f"dev-{i:05d}",
        member=f"member-{i:05d}",
        node_id=node,
        update_sha256=f"{i:064x}",
        examples_reported=400,
        value_units=1_000_000 + i,
    )


def _round(members: int, *, copies: int = COPIES, number: int = 1, drops: int = 0) -> RoundLogRecord:
    """A valued round of `members` updates whose nodes hold data sets `copies` times over (the last maybe fewer):
    each data set's nodes one player, every pair of them reported alike."""
    nodes = [_node(i) for i in range(members)]
    groups = tuple(tuple(nodes[g : g + copies]) for g in range(0, members, copies) if members - g > 1)
    return RoundLogRecord(
        job_id=JOB,
        run_id=RUN,
        round=number,
        global_sha256="ab" * 32,
        updates=tuple(_update(i, n) for i, n in enumerate(nodes)),
        drops=tuple(RoundDropEntry(device=None, node_id=NODE0 - 1 - i, reason="no_reply") for i in range(drops)),
        valuation="first_order",
        groups=groups,
        same_data=tuple(
            RoundSameDataPair(nodes=pair, similarity_milli=900) for group in groups for pair in combinations(group, 2)
        ),
    )


def test_a_round_of_1000_members_in_copy_groups_is_logged_in_parts_that_join_back_into_it() -> None:
    whole = _round(1_100)
    assert len(whole.canonical_json()) > MAX_SIGNED_SIZE  # one leaf could not hold it
    parts = split_round_record(whole)
    assert [(p.part, p.parts) for p in parts] == [(1, 2), (2, 2)]
    for part in parts:
        body = part.canonical_json()
        assert len(body) <= MAX_SIGNED_SIZE and decode_round_record(body) == part  # each a valid leaf on its own
    assert sum(len(p.updates) for p in parts) == 1_100 and sum(len(p.same_data) for p in parts) == 55 * 190
    assert join_round_parts(reversed(parts)) == [whole]  # in any order


def test_a_round_that_fits_in_a_leaf_is_one_leaf_with_the_bytes_it_had() -> None:
    small = _round(40)
    assert split_round_record(small) == (small,)
    assert b'"part' not in small.canonical_json()  # a leaf from before parts keeps its bytes
    assert join_round_parts([small]) == [small]


@settings(max_examples=60, deadline=None)
@given(
    members=st.integers(min_value=1, max_value=60),
    copies=st.integers(min_value=2, max_value=6),
    drops=st.integers(min_value=0, max_value=5),
    limit=st.integers(min_value=900, max_value=20_000),
)
def test_any_round_split_under_any_limit_gives_parts_under_it_that_join_back(
    members: int, copies: int, drops: int, limit: int
) -> None:
    whole = _round(members, copies=copies, drops=drops)
    parts = split_round_record(whole, limit=limit)
    assert all(len(p.canonical_json()) <= limit for p in parts)
    assert len(parts) == 1 or len(whole.canonical_json()) > limit
    assert join_round_parts(parts) == [whole]


def test_an_entry_larger_than_a_leaf_is_refused_by_name() -> None:
    with pytest.raises(TooLargeError) as refused:
        split_round_record(_round(60, copies=60), limit=1_200)  # one group of 60 node ids: 1,260 bytes
    assert refused.value.reason == "too_large" and "list='groups'" in str(refused.value)


def test_parts_that_are_not_a_round_are_refused() -> None:
    whole = _round(300)
    parts = split_round_record(whole, limit=40_000)
    assert len(parts) >= 3
    first, second, *rest = parts
    cases = {
        "a part missing": [first, *rest],
        "a part twice": [first, second, second, *rest],
        "a round twice": [whole, whole],
        "a header changed": [first, second.model_copy(update={"global_sha256": "ef" * 32}), *rest],
    }
    for case, records in cases.items():
        with pytest.raises(MalformedError) as refused:
            join_round_parts(records)
        assert refused.value.reason == "malformed", case
    # A part alone is checked only for its own order; what its evidence names is checked once joined.
    stray = RoundSameDataPair(nodes=(1, 2), similarity_milli=900)
    alone = second.model_copy(update={"same_data": (stray, *second.same_data)})
    assert decode_round_record(alone.canonical_json()) == alone
    with pytest.raises(MalformedError, match="do not make a round"):
        join_round_parts([first, alone, *rest])
    with pytest.raises(MalformedError, match="only a whole round"):
        split_round_record(first)


def test_a_job_group_set_names_each_of_its_pairs_once_with_the_members_of_its_nodes() -> None:
    devices = tuple(
        JobDeviceEntry(device=f"d-{i}", member=f"m-{i % 3}", node_id=10 + i, selected=True) for i in range(5)
    )
    job = JobLogRecord(
        job_id=JOB, run_id=RUN, task_id="plaid-appliance", task_version=1, purpose="research", buyer="acme",
        status="completed", rounds=2, rounds_completed=2, started_ms=NOW_MS, ended_ms=NOW_MS, devices=devices,
        job_groups=(JobGroupEntry(nodes=(13, 14), members=("m-0", "m-1"), rounds=(2,)),),
        job_group_sets=(JobGroupSet(nodes=(10, 11, 12), rounds=(1, 2)),),
    )  # fmt: skip
    assert job.job_pairs() == {
        (10, 11): (("m-0", "m-1"), (1, 2)),
        (10, 12): (("m-0", "m-2"), (1, 2)),
        (11, 12): (("m-1", "m-2"), (1, 2)),
        (13, 14): (("m-0", "m-1"), (2,)),
    }
    assert decode_job_record(job.canonical_json()) == job
    for wrong in (
        {"job_groups": (JobGroupEntry(nodes=(10, 12), members=("m-0", "m-2"), rounds=(2,)),)},  # a pair twice
        {"job_group_sets": (JobGroupSet(nodes=(10, 11, 99), rounds=(1,)),)},  # a node the job did not invite
    ):
        with pytest.raises(MalformedError):
            decode_job_record(job.model_copy(update=wrong).canonical_json())


# --- The whole path: `serve`'s follower, `job settle`, `ledger recompute-job`, the dashboard's digest ------------


def _capture(jobs_dir: Path, server_round: int, nodes: list[int], drops: list[NodeDrop]) -> None:
    global_arrays = {"w": np.zeros(2, dtype=np.float32)}
    updates = tuple(
        CapturedUpdate(server_round, node, {"w": np.full(2, i, dtype=np.float32)},
                       arrays_sha256({"w": np.full(2, i, dtype=np.float32)}), arrays_sha256(global_arrays), 40, 1, {})
        for i, node in enumerate(nodes)
    )  # fmt: skip
    CaptureDirectory(jobs_dir / f"run-{RUN}").on_round(
        RoundCapture(RUN, server_round, arrays_sha256(global_arrays), updates, tuple(drops))
    )


def _many_member_job(jobs_dir: Path, members: int) -> JobRecord:
    """A job of `members` devices (one member each) holding data sets `COPIES` times over, two valued rounds: each
    data set's copies one player, every pair reported alike, so every pair a job group paid as one in both rounds;
    and three devices at the end whose two pairs (a-b, b-c) are job groups that make no set (a-c never alike)."""
    devices = [
        JobDevice(device_id=f"dev-{i:05d}", member_id=f"member-{i:05d}", node_id=_node(i)) for i in range(members)
    ]
    ids = [str(d.node_id) for d in devices]
    copied, path = ids[:-3], ids[-3:]
    groups = [copied[g : g + COPIES] for g in range(0, len(copied), COPIES)] + [path]
    similar = [(a, b) for group in groups[:-1] for a, b in combinations(group, 2)] + [
        (path[0], path[1]),
        (path[1], path[2]),
    ]
    rng = random.Random(7)
    values = {r: {node: rng.randrange(1, 10**9) for node in ids} for r in (1, 2)}
    for r in (1, 2):
        capture_drops = [NodeDrop(r, NODE0 - 1, DropReason.NO_REPLY, "no reply")] if r == 2 else []
        _capture(jobs_dir, r, [d.node_id for d in devices], capture_drops)
    outcome = JobOutcome(
        run_id=RUN, status="finished", rounds_completed=2, final_model_sha256=FINAL_SHA,
        attribution={node: values[1][node] + values[2][node] for node in ids},
        attribution_history={node: NodeHistory(rounds=2) for node in ids},
        attribution_rounds={
            r: RoundAttribution(
                method="first_order", values=values[r], groups=groups,
                same_data=[SameDataSimilarity(pair=pair, similarity_milli=900) for pair in similar],
            )
            for r in (1, 2)
        },
        job_groups=[JobGroup(pair=pair, rounds=[1, 2]) for pair in similar],
    )  # fmt: skip
    return JobRecord(
        request=JobRequest(job_id=JOB, task_id="plaid-appliance", task_version=1, rounds=2,
                           validation_path=jobs_dir / "validation.npz", purpose="research", buyer="acme", min_nodes=1),
        invited=devices, nonces={d.device_id: "ab" * 16 for d in devices},
        selected_node_ids=[d.node_id for d in devices],
        run_id=RUN, status="completed", flower_status="finished:completed", rounds_completed=2, started_ms=NOW_MS,
        ended_ms=NOW_MS + 60_000, outcome=outcome, model_version=model_version(JOB, FINAL_SHA),
    )  # fmt: skip


def test_a_job_of_1100_members_holding_55_data_sets_is_logged_settled_and_recomputed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "coordinator.toml"
    config.write_text(f'mid = "test-mid"\ndata_dir = "{data}"\n[royalties]\nfee_bps = 2000\n')
    book = JobBook(data / "federation" / "job-book")
    book.write(_many_member_job(data / "federation" / "jobs", 1_103))
    stop = threading.Event()
    with LedgerStore.open(data / "ledger.sqlite", SignerKey.generate("midgate/test-mid")) as ledger:
        follower = JobLedger(book, data / "federation" / "jobs", ledger, RoyaltySettings(fee_bps=2000).policy(), "EUR")

        def serve() -> None:  # what serve's task does
            while not stop.wait(0.05):
                follower.follow()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            args = ["settle", JOB, "--payment", "1000000", "--currency", "EUR", "-c", str(config)]
            settled = CliRunner().invoke(job_app, args)
        finally:
            stop.set()
            thread.join()
        assert settled.exit_code == 0, settled.output
        kinds = [decode_leaf(body).kind for _, body in ledger.leaves(0, ledger.size)]
        assert kinds == [LeafKind.JOB] + [LeafKind.ROUND] * 4 + [LeafKind.SETTLEMENT]  # two rounds, two parts each
        assert "SETTLEMENT leaf 5" in settled.stdout and "members 800000" in settled.stdout

        job = decode_job_record(decode_leaf(ledger.leaf(0)).signed)
        assert len(job.canonical_json()) < MAX_SIGNED_SIZE // 4
        assert [len(s.nodes) for s in job.job_group_sets] == [COPIES] * 55
        assert [g.nodes for g in job.job_groups] == [(_node(1100), _node(1101)), (_node(1101), _node(1102))]
        assert len(job.job_pairs()) == 55 * 190 + 2

    recomputed = CliRunner().invoke(midgate, ["ledger", "recompute-job", JOB, "--db", str(data / "ledger.sqlite")])
    assert recomputed.exit_code == 0, recomputed.output
    assert (
        f"job {JOB}'s attribution (1103 members, 10452 job groups) reproduces from its 2 rounds'" in recomputed.output
    )

    shown = CliRunner().invoke(midgate, ["ledger", "show", str(data / "ledger.sqlite")])
    assert shown.exit_code == 0, shown.output
    about = [line.split("\t")[4] for line in shown.output.splitlines() if line.count("\t") == 4]
    assert about[0] == f"job {JOB} completed, 2/2 rounds, 1103 devices"
    assert [line.split(",")[0] for line in about[1:]] == [
        f"job {JOB} round {r} (part {p} of 2)" for r in (1, 2) for p in (1, 2)
    ]
    assert sum(int(line.split(", ")[1].split()[0]) for line in about[1:]) == 2 * 1_103  # each update once

    with LedgerReader.open_existing(data / "ledger.sqlite") as reader:
        digest = LedgerDigest().refresh(reader)
    rounds = digest.jobs[JOB].rounds
    assert [(index, r.round, len(r.updates), len(r.drops), r.parts) for index, r in rounds] == [
        (1, 1, 1_103, 0, 1),
        (3, 2, 1_103, 1, 1),
    ]


def test_job_start_refuses_a_job_whose_job_leaf_could_not_name_its_devices(tmp_path: Path) -> None:
    request = JobRequest(job_id=JOB, task_id="plaid-appliance", task_version=1, rounds=40, purpose="research",
                         buyer="acme", validation_path=tmp_path / "validation.npz", min_nodes=1)  # fmt: skip
    devices = [JobDevice(device_id=f"dev-{i:05d}", member_id=f"member-{i:05d}", node_id=_node(i)) for i in range(4_000)]
    check_job_leaf_room(request, devices[:3_000])
    with pytest.raises(JobRequestError) as refused:
        check_job_leaf_room(request, devices)
    assert refused.value.reason == "too_many_devices" and refused.value.details["devices"] == 4_000
