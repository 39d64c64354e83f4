"""A member recomputes a JOB leaf's attribution from docs/protocol.md alone ("Recomputing a JOB leaf's attribution").

Everything above "The harness" uses only what docs/protocol.md says and the standard library: nothing of midgate (a
test checks this module's imports). It reads the JOB and ROUND leaves' bodies as the ledger holds them (canonical
JSON), joins a round's parts, runs the three steps of the doc under the rule the JOB leaf names (`same_data_kept`,
absent: "larger") and compares with the leaf. The harness logs jobs through the real path (the account, outcome.json's
record, `serve`'s JOB and ROUND records; tests/test_job_attribution_recompute.py) and hands the client their bytes.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

# --- the client: docs/protocol.md and nothing else -------------------------------------------------------------------

REFERENCE, EVIDENCE, LINKED = 450, 300, 300  # same_data_reference, same_data_evidence, same_data_linked in milli-units
Pair = tuple[int, int]
Member = tuple[int, int, int]  # value_units, rounds, excluded_rounds


def join_parts(bodies: list[bytes]) -> list[dict[str, Any]]:
    """The job's rounds in round order, a round logged in parts joined by `part`, each list concatenated."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for body in bodies:
        record = json.loads(body)
        by_round.setdefault(record["round"], []).append(record)
    rounds = []
    for number in sorted(by_round):
        parts = sorted(by_round[number], key=lambda r: r.get("part", 1))
        joined = dict(parts[0])
        for name in ("updates", "drops", "groups", "same_data"):
            joined[name] = [item for part in parts for item in part.get(name, [])]
        rounds.append(joined)
    return rounds


def recompute(job_body: bytes, round_bodies: list[bytes]) -> tuple[dict[str, Member], dict[Pair, list[int]]]:
    """Each member's (value_units, rounds, excluded_rounds) and each job group's linked rounds, by the doc's steps."""
    job = json.loads(job_body)
    kept = job.get("same_data_kept", "larger")
    member_of = {int(d["node_id"]): d["member"] for d in job["devices"]}
    valued = []
    for record in join_parts(round_bodies):
        if not record["valuation"]:
            continue
        values = {int(u["node_id"]): u["value_units"] or 0 for u in record["updates"]}
        groups = [tuple(int(n) for n in group) for group in record["groups"]]
        grouped = {n for group in groups for n in group}
        singles = [(int(u["node_id"]),) for u in record["updates"] if not u["excluded"]]
        players = groups + [player for player in singles if player[0] not in grouped]
        similarity = {(int(p["nodes"][0]), int(p["nodes"][1])): p["similarity_milli"] for p in record["same_data"]}
        excluded = {int(u["node_id"]) for u in record["updates"] if u["excluded"]}
        valued.append((record["round"], values, players, similarity, excluded))

    # 1. The evidence: a CUSUM per pair of nodes both admitted, a job group where it reaches 300.
    running: dict[Pair, int] = {}
    job_groups: dict[Pair, list[int]] = {}
    for _, _, players, similarity, _ in valued:
        admitted = {n for player in players for n in player}
        for pair in set(running) | set(similarity):
            if pair[0] in admitted and pair[1] in admitted:
                running[pair] = max(0, running.get(pair, 0) + similarity.get(pair, 0) - REFERENCE)
                if running[pair] >= EVIDENCE:
                    job_groups.setdefault(pair, [])

    # 2. Each round: players and linked job groups joined; a set of more than one node paid as one member.
    members: dict[str, Member] = {}
    for number, values, players, similarity, excluded in valued:
        admitted = {n for player in players for n in player}
        links = [p for p in job_groups if p[0] in admitted and p[1] in admitted and similarity.get(p, 0) >= LINKED]
        for pair in links:
            job_groups[pair].append(number)
        parent = {n: n for n in admitted}
        for a, b in [(player[0], n) for player in players for n in player[1:]] + links:
            parent[root(parent, a)] = root(parent, b)
        sets: dict[int, list[int]] = {}
        for n in admitted:
            sets.setdefault(root(parent, n), []).append(n)
        settled = dict(values)
        for nodes in (s for s in sets.values() if len(s) > 1):
            player_values = [sum(values[n] for n in player) for player in players if set(player) & set(nodes)]
            above_0 = [v for v in player_values if v > 0]
            keeps = min(above_0) if kept == "smaller" and above_0 else max(player_values)
            excess = sum(values[n] for n in nodes) - keeps
            positive = sum(values[n] for n in nodes if values[n] > 0)
            if excess > 0 and positive > 0:
                for n in nodes:
                    if values[n] > 0:
                        settled[n] = values[n] * (positive - excess) // positive
        # 3. A member's value, valued rounds and excluded rounds: its nodes' sums.
        for node, units in settled.items():
            value, count, out = members.get(member_of[node], (0, 0, 0))
            members[member_of[node]] = (value + units, count + 1, out + (node in excluded))
    return members, job_groups


def root(parent: dict[int, int], n: int) -> int:
    while parent[n] != n:
        n = parent[n]
    return n


def logged(job_body: bytes) -> tuple[dict[str, Member], dict[Pair, list[int]]]:
    """What the JOB leaf says: the members' attribution and every job group (pairs, and every pair of a set)."""
    job = json.loads(job_body)
    members = {m["member"]: (m["value_units"], m["rounds"], m["excluded_rounds"]) for m in job["attribution"]}
    groups = {(int(g["nodes"][0]), int(g["nodes"][1])): list(g["rounds"]) for g in job.get("job_groups", [])}
    for group_set in job.get("job_group_sets", []):
        nodes = [int(n) for n in group_set["nodes"]]
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                groups[(a, b)] = list(group_set["rounds"])
    return members, groups


# --- The harness -----------------------------------------------------------------------------------------------------

from test_job_attribution_recompute import (  # noqa: E402
    _pair_job,
    logged_before_the_rule,
    logged_job,
    planted,  # noqa: F401 (the fixture)
)

from coordinator.attribution import RoundValuation  # noqa: E402
from protocol.job_log import JobLogRecord, RoundLogRecord  # noqa: E402


def _bodies(job: JobLogRecord, rounds: list[RoundLogRecord]) -> tuple[bytes, list[bytes]]:
    return job.canonical_json(), [r.canonical_json() for r in rounds]


def test_the_client_imports_nothing_of_midgate() -> None:
    source = Path(__file__).read_text()
    client = ast.parse(source.split("# --- The harness")[0])
    imported = {alias.name.split(".")[0] for node in ast.walk(client) if isinstance(node, ast.Import)
                for alias in node.names}  # fmt: skip
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(client) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "ast", "json", "pathlib", "typing", "pytest"}, imported


def test_a_planted_same_data_job_recomputes_from_the_docs(
    tmp_path: Path,
    planted: tuple[list[RoundValuation], dict[int, str]],  # noqa: F811 (the fixture imported above)
) -> None:
    valuations, member_of = planted
    _, job, rounds = logged_job(tmp_path, valuations, member_of)
    members, groups = recompute(*_bodies(job, rounds))
    assert (members, groups) == logged(job.canonical_json())
    assert groups == {(11, 17): [1, 2]}  # the planted pair: the client found the group the JOB leaf names


@pytest.mark.parametrize("kept", ["smaller", "larger"])
def test_the_rule_the_job_leaf_names_is_the_rule_the_client_runs(tmp_path: Path, kept: str) -> None:
    # Round 1's pair two players valued 0.3 and 0.2, then one player: 0.2 kept there, or 0.3 by a leaf from before.
    _, job, rounds, _ = _pair_job(tmp_path, (0.3, 0.2))
    if kept == "larger":  # a leaf from before the rule was named, settled keeping the larger value
        job = logged_before_the_rule(job, rounds)
    job_body, round_bodies = _bodies(job, rounds)
    members, groups = recompute(job_body, round_bodies)
    assert (members, groups) == logged(job_body)
    assert members["vic"][0] + members["syb"][0] == {"smaller": 600_000_000, "larger": 700_000_000}[kept]
    # The same values read under the other rule are not what the leaf's rounds give.
    other = json.loads(job_body)
    if kept == "smaller":
        other.pop("same_data_kept")
    else:
        other["same_data_kept"] = "smaller"
    assert recompute(json.dumps(other).encode(), round_bodies)[0] != logged(job_body)[0]


def test_a_round_in_parts_is_joined_before_the_steps(tmp_path: Path) -> None:
    _, job, rounds, _ = _pair_job(tmp_path, (0.3, 0.2))
    # Round 2 logged as two parts, each with the round's header and a slice of its lists (docs: "A round in parts").
    whole = json.loads(rounds[1].canonical_json())
    first = {**whole, "part": 1, "parts": 2, "updates": whole["updates"][:2], "same_data": []}
    second = {**whole, "part": 2, "parts": 2, "updates": whole["updates"][2:]}
    first.pop("groups", None)
    bodies = [rounds[0].canonical_json(), json.dumps(second).encode(), json.dumps(first).encode()]
    bodies += [r.canonical_json() for r in rounds[2:]]
    assert recompute(job.canonical_json(), bodies) == logged(job.canonical_json())
