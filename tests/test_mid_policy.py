"""The MID's policy file and its POLICY leaves, on a real SQLite ledger and through the real commands: a fee above
30 % is refused, a change appends a leaf with the next version, an unchanged file (even re-spelled) appends none,
`serve` logs the configured policy when it starts, and a job settles under the version in force when it started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import CoordinatorSettings
from coordinator.ledger.store import LedgerReader
from coordinator.policy.document import DEFAULT_PURPOSES, configured_policy, parse_policy
from coordinator.policy.ledger_records import PolicyLog, current_policy, iter_policies, policy_at
from coordinator.serve.assembly import build_policy_log, open_storage, settlement_policy
from protocol.errors import MalformedError, PolicyViolationError, Reason
from protocol.job_log import JobLogRecord

_CLI = [sys.executable, "-c", "from midgate_cli import app; app()", "coordinator"]

POLICY = """
fee_bps = {fee}
[knob]
base_price_minor = 1000
alpha_milli = 693
min_price_minor = 100
max_price_minor = 100000
[reputation]
min_milli = {{ default = 0, health = 500 }}
[strikes]
quorum_bps = 6000
min_members = 3
[leave]
royalties_continue = true
notice_days = 14
[[purposes]]
code = "research"
dpv = "dpv:ResearchAndDevelopment"
label = "Research and development"
licence = "research only"
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f'mid = "riverside"\ndata_dir = "{tmp_path / "data"}"\npolicy_file = "{tmp_path / "policy.toml"}"\n'
    )
    return path


def _write(tmp_path: Path, fee: int, extra: str = "") -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(extra + POLICY.format(fee=fee))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_CLI, *args], capture_output=True, text=True, timeout=120)


def test_the_file_holds_the_whole_policy(tmp_path: Path) -> None:
    policy = parse_policy(_write(tmp_path, 2500).read_bytes())
    assert (policy.fee_bps, policy.strikes.quorum_bps, policy.leave.notice_days) == (2500, 6000, 14)
    assert (policy.min_reputation_milli("health"), policy.min_reputation_milli("other")) == (500, 0)
    assert policy.purpose("research").dpv == "dpv:ResearchAndDevelopment"
    with pytest.raises(PolicyViolationError):
        policy.purpose("ads")  # not in this file's vocabulary
    assert policy.royalty(4).version == 4 and policy.royalty(4).fee_bps == 2500


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (POLICY.format(fee=3001), PolicyViolationError),
        (POLICY.format(fee=1000).replace("min_price_minor = 100", "min_price_minor = 5000"), PolicyViolationError),
        (POLICY.format(fee=1000) + "surprise = 1\n", MalformedError),
        (POLICY.format(fee=1000).replace('code = "research"', 'code = "Research!"'), MalformedError),
        ("fee_bps = [", MalformedError),
    ],
)
def test_a_file_that_breaks_policy_is_refused(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_policy(text.encode())


def test_a_change_appends_the_next_version_and_an_unchanged_file_appends_nothing(tmp_path: Path) -> None:
    settings = CoordinatorSettings.load(_config(tmp_path))
    _write(tmp_path, 1500)
    storage = open_storage(settings)
    try:
        policies = build_policy_log(settings, storage)  # what serve does when it starts
        assert [v.version for v in policies.versions] == [1] and storage.ledger.size == 1
        # Unchanged, even re-spelled with a comment: no leaf.
        _write(tmp_path, 1500, extra="# reviewed\n")
        assert policies.sync() is None and storage.ledger.size == 1
        _write(tmp_path, 2000)
        logged = policies.sync()
        assert logged is not None and (logged.version, logged.policy.fee_bps) == (2, 2000)
        # A refused file appends nothing and leaves version 2 in force.
        _write(tmp_path, 3500)
        assert policies.follow() is None and policies.current() == logged and storage.ledger.size == 2
        # A restart reads the versions back from the log; the same file logs nothing more.
        _write(tmp_path, 2000)
        again = build_policy_log(settings, storage)
        assert [v.version for v in again.versions] == [1, 2] and storage.ledger.size == 2
    finally:
        storage.close()
    with LedgerReader.open_existing(settings.ledger_path) as reader:
        current = current_policy(reader)
        assert current is not None and current.version == 2 and current.royalty().fee_bps == 2000
        assert [v.record.policy.fee_bps for v in iter_policies(reader)] == [1500, 2000]


def test_serve_refuses_to_start_with_a_fee_above_the_cap(tmp_path: Path) -> None:
    settings = CoordinatorSettings.load(_config(tmp_path))
    _write(tmp_path, 3001)
    storage = open_storage(settings)
    try:
        with pytest.raises(PolicyViolationError):
            build_policy_log(settings, storage)
        assert storage.ledger.size == 0
    finally:
        storage.close()


def test_a_job_settles_under_the_version_in_force_when_it_started(tmp_path: Path) -> None:
    settings = CoordinatorSettings.load(_config(tmp_path))
    _write(tmp_path, 1000)
    storage = open_storage(settings)
    clock = iter([1_790_000_000_000, 1_790_000_100_000])
    try:
        policies = PolicyLog(storage.ledger, lambda: configured_policy(settings), clock_ms=lambda: next(clock))
        policies.sync()
        _write(tmp_path, 2500)
        policies.sync()  # changed while the job ran
        job = JobLogRecord.model_construct(started_ms=1_790_000_050_000)
        assert settlement_policy(policies)(job).fee_bps == 1000
        assert settlement_policy(policies)(JobLogRecord.model_construct(started_ms=1_790_000_200_000)).fee_bps == 2500
        assert policy_at(storage.ledger, 1_790_000_050_000).version == 1  # type: ignore[union-attr]
    finally:
        storage.close()


def test_without_a_file_the_policy_is_royalties_with_the_default_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(f'mid = "riverside"\ndata_dir = "{tmp_path / "data"}"\n[royalties]\nfee_bps = 2200\n')
    policy = configured_policy(CoordinatorSettings.load(path))
    assert policy.fee_bps == 2200 and policy.purposes == list(DEFAULT_PURPOSES)


def test_policy_apply_and_show_through_the_cli(tmp_path: Path) -> None:
    config = _config(tmp_path)
    too_high = tmp_path / "too-high.toml"
    too_high.write_text(POLICY.format(fee=3001))
    refused = _cli("policy", "apply", str(too_high), "--config", str(config), "--timeout", "0")
    assert refused.returncode == 2 and "policy refused: policy_violation" in refused.stderr, refused.stderr
    assert not (tmp_path / "policy.toml").exists()
    # No serve running: the file is installed and the command says it is not logged yet.
    new = tmp_path / "new.toml"
    new.write_text(POLICY.format(fee=1200))
    pending = _cli("policy", "apply", str(new), "--config", str(config), "--timeout", "0.5")
    assert pending.returncode == 1 and "not in the ledger" in pending.stderr, pending.stderr
    assert (tmp_path / "policy.toml").read_text() == new.read_text()
    shown = _cli("policy", "show", "--config", str(config))
    assert shown.returncode == 0 and "no POLICY leaf yet" in shown.stdout and "differs" in shown.stdout, shown.stdout
    # serve's start logs it; applying the same policy again is then a no-op.
    settings = CoordinatorSettings.load(config)
    storage = open_storage(settings)
    try:
        build_policy_log(settings, storage)
    finally:
        storage.close()
    same = _cli("policy", "apply", str(new), "--config", str(config))
    assert same.returncode == 0 and "unchanged: this is policy version 1" in same.stdout, same.stdout + same.stderr
    shown = _cli("policy", "show", "--config", str(config))
    assert "current: version 1" in shown.stdout and '"fee_bps": 1200' in shown.stdout, shown.stdout
    assert Reason.POLICY_VIOLATION.value == "policy_violation"


def test_the_readme_example_is_a_policy() -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("## The MID's policy") :]
    start = section.index("```toml\n") + len("```toml\n")
    policy = parse_policy(section[start : section.index("```", start)].encode())
    assert (policy.fee_bps, policy.strikes.quorum_bps, [p.code for p in policy.purposes]) == (1500, 5000, ["research"])


def test_a_policy_change_reaches_only_quotes_made_after_it(tmp_path: Path) -> None:
    from coordinator.royalties.quote import quote_job

    settings = CoordinatorSettings.load(_config(tmp_path))
    _write(tmp_path, 1000)
    storage = open_storage(settings)
    try:
        policies = build_policy_log(settings, storage)
        knobs = {"ann": 0, "bob": 500}
        before = quote_job(knobs, current_policy(storage.ledger).royalty())  # type: ignore[union-attr]
        _write(tmp_path, 3000)
        policies.sync()
        after = quote_job(knobs, current_policy(storage.ledger).royalty())  # type: ignore[union-attr]
        assert (before.policy_version, after.policy_version) == (1, 2)
        assert before.members_minor == after.members_minor and before.fee_minor < after.fee_minor
        # The earlier quote's version is still in the log, unchanged, for its settlement.
        assert policies.version(before.policy_version).royalty().fee_bps == 1000
    finally:
        storage.close()


def test_a_notice_without_an_end_of_royalties_is_logged_with_a_warning_that_it_does_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = CoordinatorSettings.load(_config(tmp_path))
    _write(tmp_path, 1500)  # notice_days = 14
    storage = open_storage(settings)
    try:
        with caplog.at_level("WARNING", logger="midgate.policy"):
            policies = build_policy_log(settings, storage)
            warned = [r for r in caplog.records if "notice_days has no effect" in r.getMessage()]
            assert len(warned) == 1 and (
                warned[0].__dict__["notice_days"],
                warned[0].__dict__["royalties_continue"],
            ) == (
                14,
                True,
            )
            caplog.clear()
            (tmp_path / "policy.toml").write_text(
                POLICY.format(fee=1500).replace("notice_days = 14", "notice_days = 0")
            )
            assert policies.sync() is not None  # no notice: logged, nothing to warn about
            assert not [r for r in caplog.records if "[leave]" in r.getMessage()]
    finally:
        storage.close()
