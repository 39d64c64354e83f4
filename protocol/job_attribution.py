"""A job's same-data groups and settled values in integer arithmetic, and their recomputation from the ledger.

The coordinator's account (coordinator/attribution/history.py) settles a job with these functions, over each
round's values in nano-units and its same-data similarities in milli-units, exactly as the job's ROUND leaves log
them (protocol/job_log.py). So anyone holding a job's JOB and ROUND leaves redoes the settlement with the same
integers (`check_job_attribution`, `midgate ledger recompute-job`) and gets the JOB leaf's values or a difference.

The rules (docs/attribution.md, section 1): each round, a pair's similarity s adds s - reference to a running sum
that never drops below 0 (a CUSUM); a pair whose sum reaches `evidence` anywhere in the job is a job pair. In every
valued round where both were admitted and s >= `linked` it is linked, and every connected set of the round's
players and links of more than one member is paid as one member: it keeps the value of its least valuable player
valued above 0 (`kept="smaller"`, what jobs are settled by; a set of one player keeps that player's value), the
excess taken from its members valued above 0 in proportion (floored), negative values left as they are. JOB leaves
from before the rule was named were settled keeping the most valuable player's value (`kept="larger"`) and
recompute so (docs/attribution.md, section 7: why the smaller).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from protocol.errors import MalformedError, SettlementMismatchError, UnknownJobError
from protocol.job_log import (
    JobLogRecord,
    JobPairs,
    RoundLogRecord,
    SameDataKept,
    decode_job_record,
    decode_round_record,
    join_round_parts,
)
from protocol.leaves import LeafKind, decode_leaf

T = TypeVar("T", int, str)

SIMILARITY_SCALE = 1000
SAME_DATA_REFERENCE_MILLI = 450
SAME_DATA_EVIDENCE_MILLI = 300
SAME_DATA_LINKED_MILLI = 300
SAME_DATA_KEPT: SameDataKept = "smaller"

Pair = tuple[str, str]


def similarity_milli(similarity: float) -> int:
    """A similarity in integer milli-units, rounded half to even: the form the ledger logs and the CUSUM adds."""
    return round(similarity * SIMILARITY_SCALE)


@dataclass(frozen=True)
class SameDataRules:
    """The job-level grouping's thresholds in milli-units (coordinator ScreenSettings: same_data_reference,
    same_data_evidence, same_data_linked) and what a set paid as one member keeps of a round (module docstring; the
    JOB leaf names it). The defaults are what `job start` runs; a reference of 1000 turns the grouping off."""

    reference_milli: int = SAME_DATA_REFERENCE_MILLI
    evidence_milli: int = SAME_DATA_EVIDENCE_MILLI
    linked_milli: int = SAME_DATA_LINKED_MILLI
    kept: SameDataKept = SAME_DATA_KEPT

    @property
    def enabled(self) -> bool:
        return self.reference_milli < SIMILARITY_SCALE


@dataclass(frozen=True)
class ValuedRound:
    """One valued round: every member's value (nano-units, undecayed), the players the screens admitted (a tuple of
    more than one member is one player) and the same-data similarities they reported, by sorted member pair."""

    round_index: int
    values: Mapping[str, int]
    players: Sequence[tuple[str, ...]]
    similarities: Mapping[Pair, int] = field(default_factory=dict)

    def admitted(self) -> set[str]:
        return {member for player in self.players for member in player}


def cusum_step(running: int, largest: int, similarity: int, reference: int) -> tuple[int, int]:
    """One round of a pair's evidence: the CUSUM max(0, S + similarity - reference) and the largest it reached."""
    running = max(0, running + similarity - reference)
    return running, max(largest, running)


@dataclass
class SameDataEvidence:
    """Per pair with any evidence so far: (the running CUSUM, the largest it reached), in milli-units."""

    rules: SameDataRules = field(default_factory=SameDataRules)
    sums: dict[Pair, tuple[int, int]] = field(default_factory=dict)

    def add(self, valued: ValuedRound) -> None:
        """Add one round; a round in which a pair was not both admitted leaves it as it is."""
        if not self.rules.enabled:
            return
        admitted = valued.admitted()
        for pair in set(self.sums) | set(valued.similarities):
            if pair[0] in admitted and pair[1] in admitted:
                running, largest = self.sums.get(pair, (0, 0))
                running, largest = cusum_step(
                    running, largest, valued.similarities.get(pair, 0), self.rules.reference_milli
                )
                if running > 0 or largest >= self.rules.evidence_milli:
                    self.sums[pair] = (running, largest)
                else:  # back where a pair without evidence starts: nothing to remember
                    self.sums.pop(pair, None)

    def job_pairs(self) -> list[Pair]:
        """Pairs whose evidence reached `evidence_milli`, sorted."""
        return sorted(pair for pair, (_, largest) in self.sums.items() if largest >= self.rules.evidence_milli)


def linked(pair: Pair, valued: ValuedRound, rules: SameDataRules) -> bool:
    """Whether a job pair is paid as one member in this round: both admitted, similarity at least `linked`."""
    admitted = valued.admitted()
    return pair[0] in admitted and pair[1] in admitted and valued.similarities.get(pair, 0) >= rules.linked_milli


def paid_as_one(valued: ValuedRound, pairs: Sequence[Pair], rules: SameDataRules) -> list[tuple[str, ...]]:
    """The round's sets of more than one member paid as one member: its players joined by the linked job pairs;
    each sorted, ordered by their first member."""
    links = [(player[0], member) for player in valued.players for member in player[1:]]
    links += [pair for pair in pairs if linked(pair, valued, rules)]
    return [group for group in union_groups(sorted(valued.admitted()), links) if len(group) > 1]


def settled_round(valued: ValuedRound, groups: Iterable[tuple[str, ...]], kept: SameDataKept) -> dict[str, int]:
    """The round's values with each set in `groups` paid as one member, keeping what `kept` says."""
    values = dict(valued.values)
    for group in groups:
        values.update(_one_member(group, valued, kept))
    return values


def settle_rounds(rounds: Sequence[ValuedRound], rules: SameDataRules) -> tuple[list[Pair], list[dict[str, int]]]:
    """The job pairs of a whole job and each round's settled values (undecayed, in the rounds' order)."""
    evidence = SameDataEvidence(rules)
    for valued in rounds:
        evidence.add(valued)
    pairs = evidence.job_pairs()
    return pairs, [settled_round(valued, paid_as_one(valued, pairs, rules), rules.kept) for valued in rounds]


def _one_member(group: tuple[str, ...], valued: ValuedRound, kept: SameDataKept) -> dict[str, int]:
    """A set paid as one member: what it earned above what it keeps (`kept`: its most valuable player's value, or its
    least valuable player's among those valued above 0; a player of several members already weighs as one) is
    taken from its members valued above 0, in proportion, floored. A value is never raised."""
    inside = set(group)
    players = [sum(valued.values[m] for m in player) for player in valued.players if inside.intersection(player)]
    positive_players = [v for v in players if v > 0]
    target = min(positive_players) if kept == "smaller" and positive_players else max(players)
    values = {member: valued.values[member] for member in group}
    excess = sum(values.values()) - target
    positive = sum(v for v in values.values() if v > 0)
    if excess <= 0 or positive <= 0:
        return values
    remaining = positive - excess
    return {member: v * remaining // positive if v > 0 else v for member, v in values.items()}


def union_groups(members: Sequence[T], links: Iterable[tuple[T, T]]) -> list[tuple[T, ...]]:
    """Connected components of `members` under `links`, each sorted, ordered by their smallest member: the groups of
    a round's screens (node indices) and of a job's same-data evidence (member ids) alike."""
    parent = {m: m for m in members}

    def root(x: T) -> T:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    grouped: dict[T, list[T]] = {}
    for m in members:
        grouped.setdefault(root(m), []).append(m)
    return sorted((tuple(sorted(g)) for g in grouped.values()), key=lambda g: g[0])


# --- From the ledger: a job's JOB leaf against its ROUND leaves --------------------------------------------------


def valued_round(record: RoundLogRecord) -> ValuedRound | None:
    """What the settlement used of a ROUND leaf, members named by node id (the account's players are the job's
    Flower nodes); None for a round not valued."""
    if not record.valuation:
        return None
    values = {str(u.node_id): u.value_units or 0 for u in record.updates}
    grouped = {node for group in record.groups for node in group}
    singles: list[tuple[str, ...]] = [
        (str(u.node_id),) for u in record.updates if not u.excluded and u.node_id not in grouped
    ]
    return ValuedRound(
        round_index=record.round,
        values=values,
        players=[tuple(str(n) for n in group) for group in record.groups] + singles,
        similarities={_pair(p.nodes[0], p.nodes[1]): p.similarity_milli for p in record.same_data},
    )


@dataclass(frozen=True)
class RecomputedJob:
    """A JOB leaf's attribution as its ROUND leaves give it: per member (value units, rounds, excluded rounds) and
    the job groups (node pair, smaller first -> its members and the rounds it was paid as one)."""

    members: dict[str, tuple[int, int, int]]
    job_groups: JobPairs


def recompute_job_attribution(
    job: JobLogRecord, rounds: Sequence[RoundLogRecord], rules: SameDataRules | None = None
) -> RecomputedJob:
    """The attribution of `job` recomputed from its ROUND leaves alone (plain sum over rounds: `job start` runs its
    account at decay 1) and the rule the JOB leaf names. Requires the rounds to be the job's, each once."""
    rules = rules or SameDataRules(kept=job.kept())
    ordered = sorted(rounds, key=lambda r: r.round)
    if any(r.job_id != job.job_id for r in ordered) or len({r.round for r in ordered}) != len(ordered):
        raise MalformedError("not the job's ROUND leaves, each once", job=job.job_id)
    member_of = {str(u.node_id): u.member for r in ordered for u in r.updates}
    valued = [v for v in map(valued_round, ordered) if v is not None]
    pairs, settled = settle_rounds(valued, rules)
    members: dict[str, tuple[int, int, int]] = {}
    for round_values, record in zip(settled, (r for r in ordered if r.valuation), strict=True):
        excluded = {str(u.node_id) for u in record.updates if u.excluded}
        for node, units in round_values.items():
            value, count, out = members.get(member_of[node], (0, 0, 0))
            members[member_of[node]] = (value + units, count + 1, out + (node in excluded))
    groups = {}
    for a, b in pairs:
        nodes = (min(int(a), int(b)), max(int(a), int(b)))
        rounds_linked = tuple(v.round_index for v in valued if linked((a, b), v, rules))
        groups[nodes] = ((member_of[str(nodes[0])], member_of[str(nodes[1])]), rounds_linked)
    return RecomputedJob(members=dict(sorted(members.items())), job_groups=dict(sorted(groups.items())))


def check_job_attribution(job: JobLogRecord, rounds: Sequence[RoundLogRecord]) -> str | None:
    """The first difference between the JOB leaf's attribution and job groups and what its ROUND leaves give, or
    None when they agree."""
    recomputed = recompute_job_attribution(job, rounds)
    logged = {m.member: (m.value_units, m.rounds, m.excluded_rounds) for m in job.attribution}
    for member in sorted(set(logged) | set(recomputed.members)):
        if logged.get(member) != recomputed.members.get(member):
            return (
                f"member {member}: the JOB leaf has (value_units, rounds, excluded_rounds) {logged.get(member)}, its"
                f" ROUND leaves give {recomputed.members.get(member)}"
            )
    groups = job.job_pairs()
    for nodes in sorted(set(groups) | set(recomputed.job_groups)):
        if groups.get(nodes) != recomputed.job_groups.get(nodes):
            return (
                f"job group {nodes}: the JOB leaf has (members, rounds) {groups.get(nodes)}, its ROUND leaves give"
                f" {recomputed.job_groups.get(nodes)}"
            )
    return None


def verify_job_attribution(job: JobLogRecord, rounds: Sequence[RoundLogRecord]) -> None:
    """Raises SettlementMismatchError naming the first difference when the JOB leaf's attribution (what its
    settlement splits by) is not what its ROUND leaves compute."""
    difference = check_job_attribution(job, rounds)
    if difference is not None:
        raise SettlementMismatchError("the JOB leaf's attribution is not what its ROUND leaves compute",
                                      job=job.job_id, first_difference=difference)  # fmt: skip


@dataclass(frozen=True)
class JobLeaves:
    """A job's JOB leaf (and its index in the log) and its rounds as its ROUND leaves give them (a round logged in
    parts joined), in round order."""

    index: int
    job: JobLogRecord
    rounds: list[RoundLogRecord]


def find_job_leaves(leaves: Iterable[tuple[int, bytes]], job_id: str) -> JobLeaves:
    """The JOB and ROUND leaves of `job_id` among a log's (index, leaf) pairs; UnknownJobError when no JOB leaf
    names it."""
    found: tuple[int, JobLogRecord] | None = None
    rounds = []
    for index, data in leaves:
        leaf = decode_leaf(data)
        if leaf.kind is LeafKind.JOB and found is None:
            job = decode_job_record(leaf.signed)
            if job.job_id == job_id:
                found = (index, job)
        elif leaf.kind is LeafKind.ROUND:
            record = decode_round_record(leaf.signed)
            if record.job_id == job_id:
                rounds.append(record)
    if found is None:
        raise UnknownJobError("no JOB leaf for this job in the log", job=job_id)
    return JobLeaves(found[0], found[1], join_round_parts(rounds))


def _pair(a: int, b: int) -> Pair:
    first, second = sorted((str(a), str(b)))
    return first, second
