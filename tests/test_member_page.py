"""The member page (edge/agent/member_page.py) against a real MID HTTP endpoint (tests/test_member_ledger_api.py's):
its statement table holds exactly the lines and totals `agent statement` prints, it is served by the agent's own
server on loopback only, answers only loopback Host names, only GET, and a non-loopback address needs the member's
explicit choice. Its knob and consent are the lines `agent knob get` and `agent consent show` print."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_member_ledger_api import ALL_TIME, MID, Mid, _now_ms, mid  # noqa: F401  (mid: the fixture)
from typer.testing import CliRunner

from edge.agent.cli import app as agent_app
from edge.agent.config import AgentSettings
from edge.agent.controls.state import allow, deny, load_member_state, save_member_state, set_knob
from edge.agent.ledger_client import LedgerClient
from edge.agent.member_page import serving_member_page
from edge.agent.member_page_view import gather, render_member_page
from edge.agent.membership import save_membership
from edge.agent.statement import fetch_statement, render_statement
from protocol.identity import save_signer_key


def _statement_rows(html: str) -> list[tuple[str, str, str]]:
    """(for, amount, currency) of each statement row on the page."""
    rows = re.findall(
        r'<tr><th scope="row">(\d{4}-\d\d-\d\d)</th><td>([^<]*)</td>'
        r'<td class="num">(\d+)</td><td class="num">([A-Z]{3})',
        html,
    )
    return [(what, amount, currency) for _, what, amount, currency in rows]


def _printed_rows(text: str) -> list[tuple[str, str, str]]:
    return re.findall(r"^  \d{4}-\d\d-\d\d  (.*?): (\d+) ([A-Z]{3}) minor units", text, re.MULTILINE)


def test_the_page_shows_what_agent_statement_prints(mid: Mid, tmp_path: Path) -> None:  # noqa: F811
    mid.cosign("ann", "bob")
    membership = mid.membership("ann", tmp_path)
    printed = render_statement(
        MID, "ann", fetch_statement(membership, LedgerClient(mid.url), None, ALL_TIME, _now_ms())
    )
    settings = AgentSettings(data_dir=tmp_path / "agent")
    html = render_member_page(gather(settings, [membership], _now_ms()), _now_ms())
    assert (
        _statement_rows(html)
        == _printed_rows(printed)
        == [
            ("job job-1", "13333", "EUR"),
            ("job job-3", "2400", "EUR"),
        ]
    )
    total = re.search(r"^Total: (\d+) EUR minor units$", printed, re.MULTILINE)
    assert total is not None and f'<th scope="row">EUR</th><td class="num">{total.group(1)}</td>' in html
    assert "Every kept receipt verified on this device (0)." in html
    assert "<script" not in html and 'role="img"' in html  # the earnings chart


def _pre(html: str, kind: str) -> str:
    found = re.search(rf'<pre class="{kind}">([^<]*)</pre>', html)
    assert found is not None, kind
    return found.group(1).replace("&#x27;", "'").replace("&quot;", '"').replace("&gt;", ">").replace("&amp;", "&")


def test_the_page_shows_the_knob_and_consent_agent_knob_get_and_consent_show_print(mid: Mid, tmp_path: Path) -> None:  # noqa: F811
    membership = mid.membership("ann", tmp_path)
    save_membership(membership.directory, membership.record)
    save_signer_key(membership.directory / "device.key", membership.key)
    config = tmp_path / "agent.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n')
    settings = AgentSettings(data_dir=tmp_path)

    def commands() -> tuple[str, str]:
        knob = CliRunner().invoke(agent_app, ["knob", "get", "--config", str(config)])
        consent = CliRunner().invoke(agent_app, ["consent", "show", "--config", str(config)])
        assert knob.exit_code == consent.exit_code == 0, knob.output + consent.output
        return knob.output.strip(), consent.output.strip()

    def page() -> tuple[str, str]:
        html = render_member_page(gather(settings, [membership], _now_ms()), _now_ms())
        return _pre(html, "knob"), _pre(html, "consent")

    default = commands()
    assert page() == default
    assert "knob +0.000 (default: never set): your price" in default[0]
    assert "purposes allowed: every purpose; buyers denied: none; default (never changed)" in default[1]

    state = load_member_state(membership.directory)
    state = deny(allow(set_knob(state, _now_ms(), -250), _now_ms(), ["research"], []), _now_ms(), [], ["acme"])
    save_member_state(membership.directory, state)
    chosen = commands()
    assert page() == chosen != default
    assert "knob -0.250: your price" in chosen[0]
    assert "purposes allowed: research; buyers denied: acme; signed policy not queued yet" in chosen[1]

    (membership.directory / "member.json").write_text("{not json")
    html = render_member_page(gather(settings, [membership], _now_ms()), _now_ms())
    assert "member file unusable" in _pre(html, "knob") and "member file unusable" in _pre(html, "consent")


def test_a_statement_the_mid_cannot_give_is_said_not_raised(tmp_path: Path, mid: Mid) -> None:  # noqa: F811
    membership = mid.membership("ann", tmp_path)
    membership.record = membership.record.model_copy(update={"enrolment_url": "http://127.0.0.1:9"})
    html = render_member_page(gather(AgentSettings(data_dir=tmp_path / "a"), [membership], _now_ms()), _now_ms())
    assert 'role="alert">no statement:' in html


def _get(url: str, method: str = "GET", host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_agent_serves_it_on_loopback_and_refuses_other_hosts_and_methods(mid: Mid, tmp_path: Path) -> None:  # noqa: F811
    mid.cosign("ann", "bob")
    settings = AgentSettings(data_dir=tmp_path / "agent", member_page_port=0)

    async def visit() -> None:
        async with serving_member_page(settings, [mid.membership("ann", tmp_path)]) as url:
            assert url is not None and url.startswith("http://127.0.0.1:")
            assert (tmp_path / "agent" / "member-page.url").read_text().strip() == url
            status, html = await asyncio.to_thread(_get, url)
            assert status == 200 and _statement_rows(html)[0] == ("job job-1", "13333", "EUR")
            assert (await asyncio.to_thread(_get, url, "GET", "evil.example"))[0] == 421
            assert (await asyncio.to_thread(_get, url, "POST"))[0] == 405
            assert (await asyncio.to_thread(_get, url + "nope"))[0] == 404

    asyncio.run(visit())
    assert not (tmp_path / "agent" / "member-page.url").exists()


def _raw(port: int, request: bytes) -> bytes:
    """What the page's server answers to `request` sent as is, until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_the_pages_server_refuses_what_is_not_a_small_http_request(tmp_path: Path) -> None:
    settings = AgentSettings(data_dir=tmp_path / "agent", member_page_port=0)

    async def visit() -> None:
        async with serving_member_page(settings, []) as url:
            assert url is not None
            port = int(url.rsplit(":", 1)[1].strip("/"))
            answers = await asyncio.gather(
                asyncio.to_thread(_raw, port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
                asyncio.to_thread(_raw, port, b"HEAD / HTTP/1.1\r\nHost: [::1]:8490\r\n\r\n"),
                asyncio.to_thread(_raw, port, b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n"),
                asyncio.to_thread(_raw, port, b"not http at all\r\n\r\n"),
                asyncio.to_thread(_raw, port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"),
            )
            get, head, bare_v6, garbage, huge = answers
            assert get.startswith(b"HTTP/1.1 200 OK\r\n") and b"belongs to no MID yet" in get
            length = int(get.split(b"content-length: ")[1].split(b"\r\n")[0])
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(
                f"content-length: {length}\r\n\r\n".encode()
            )
            assert bare_v6.startswith(b"HTTP/1.1 200 OK\r\n")
            assert garbage.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert huge.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")

    asyncio.run(visit())


def test_beyond_loopback_only_when_the_member_turns_it_on(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="member_page_home_network"):
        AgentSettings(data_dir=tmp_path, member_page_host="0.0.0.0")
    assert AgentSettings(data_dir=tmp_path, member_page_host="0.0.0.0", member_page_home_network=True)
    assert AgentSettings(data_dir=tmp_path, member_page_host="::1").member_page_port == 8490
