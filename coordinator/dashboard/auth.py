"""The operator's login to the dashboard: one password, hashed with scrypt, and server-side sessions.

The hash file (`operator-password` in the data folder, written 0600 by `midgate coordinator operator passwd`) holds
one line `scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`. scrypt (RFC 7914, in the standard library) is memory-hard:
n = 2^15, r = 8 costs 32 MiB and about 0.1 s per guess on this class of machine, which is the point. Comparisons are
constant-time. A session is a random 256-bit token kept only in the serving process's memory (a restart logs the
operator out) and sent as a cookie that scripts cannot read (HttpOnly), that no other site's request carries
(SameSite=Strict) and, behind the TLS proxy, only over HTTPS (Secure). The login and logout forms also carry a CSRF
token, because SameSite alone leaves them open to a same-site page (another service on a sibling host) and to
browsers that ignore it: the logout form's is an HMAC of the session under a key only this process holds, the login
form's an HMAC of a random nonce in a short-lived cookie for the login path (a page elsewhere can neither read the
cookie nor compute the token). A POST without the right one is refused `csrf` and counted. Failed logins are
counted (reason `bad_login`); after `MAX_FAILURES` within `FAILURE_WINDOW_S` every login is refused
`rate_limited` until the window passes, so a guesser gets a few tries a minute whatever the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import MalformedError, ProtocolError, Reason
from protocol.private_files import FILE_MODE, private_dir

SCRYPT_LOG2_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
_MAXMEM = 256 * 1024 * 1024
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024
MAX_FAILURES = 5
FAILURE_WINDOW_S = 60.0
SESSION_COOKIE = "midgate_operator"
LOGIN_COOKIE = "midgate_login"
"""The login form's nonce cookie (Path=/operator/login), set when the form is served."""
LOGIN_COOKIE_TTL_S = 3600
CSRF_FIELD = "csrf"
MAX_TOKEN_CHARS = 128


class BadLoginError(ProtocolError):
    reason = Reason.BAD_LOGIN


class LoginRateLimitedError(ProtocolError):
    reason = Reason.RATE_LIMITED


class CsrfError(ProtocolError):
    reason = Reason.CSRF


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=1 << log2_n, r=r, p=p, maxmem=_MAXMEM, dklen=32)


def hash_password(password: str, *, log2_n: int = SCRYPT_LOG2_N) -> str:
    """The hash line for `password` (a fresh 16-byte salt). Requires MIN..MAX_PASSWORD_CHARS characters."""
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise MalformedError(
            "the operator password must have 12 to 1024 characters",
            expected=f"{MIN_PASSWORD_CHARS}..{MAX_PASSWORD_CHARS}",
            found=len(password),
        )
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, log2_n, SCRYPT_R, SCRYPT_P)
    return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_password(line: str, password: str) -> bool:
    """Whether `password` matches the hash line; a line that is not one (wrong fields, parameters out of range)
    raises MalformedError."""
    parts = line.strip().split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("not scrypt$n$r$p$salt$hash")
        log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        if not (10 <= log2_n <= 20 and 1 <= r <= 16 and 1 <= p <= 4):
            raise ValueError("scrypt parameters out of range")
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError as error:
        raise MalformedError("not an operator password hash", error=str(error)) from None
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    return hmac.compare_digest(_scrypt(password, salt, log2_n, r, p), digest)


def set_operator_password(path: Path, password: str) -> None:
    """Write the hash of `password` to `path`, 0600 (replacing any before: the old one stops working)."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.write(fd, (hash_password(password) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


@dataclass
class OperatorLogin:
    """Checks the operator's password against the hash file (read at each login: `operator passwd` takes effect
    without a restart) and keeps the sessions it opened.

    Parameters
    ----------
    password_file: the hash file; absent, every login is refused (the dashboard is closed until a password is set).
    session_ttl_s: how long a session lasts after login.
    clock: seconds, monotonic.
    """

    password_file: Path
    session_ttl_s: float = 8 * 3600.0
    clock: Callable[[], float] = time.monotonic
    _sessions: dict[str, float] = field(default_factory=dict)
    _failures: deque[float] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _form_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    """Keys the forms' CSRF tokens; in memory only, so a restart voids every form served before, as every session."""

    @staticmethod
    def login_nonce() -> str:
        return secrets.token_urlsafe(32)

    def form_token(self, form: str, bound_to: str) -> str:
        """The CSRF token of `form` ("login" or "logout") bound to a login nonce or a session."""
        digest = hmac.new(self._form_key, f"{form}\n{bound_to}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def check_form_token(self, form: str, bound_to: str | None, token: str | None) -> None:
        """Raises CsrfError unless `token` is `form`'s token for `bound_to` (constant-time)."""
        if not bound_to or not token or len(bound_to) > MAX_TOKEN_CHARS or len(token) > MAX_TOKEN_CHARS:
            raise CsrfError(f"the {form} form's token is missing", cookie=bool(bound_to), token=bool(token))
        if not hmac.compare_digest(self.form_token(form, bound_to), token):
            raise CsrfError(f"the {form} form's token is not this session's: reload the page", form=form)

    @property
    def configured(self) -> bool:
        return self.password_file.exists()

    def login(self, password: str) -> str:
        """A new session token, or BadLoginError / LoginRateLimitedError (counted by the caller)."""
        now = self.clock()
        with self._lock:
            while self._failures and now - self._failures[0] > FAILURE_WINDOW_S:
                self._failures.popleft()
            if len(self._failures) >= MAX_FAILURES:
                raise LoginRateLimitedError("too many failed logins: wait a minute", failures=len(self._failures))
        ok = self.configured and check_password(self.password_file.read_text(), password)
        with self._lock:
            if not ok:
                self._failures.append(now)
                raise BadLoginError("wrong operator password" if self.configured else "no operator password is set")
            token = secrets.token_urlsafe(32)
            self._sessions = {t: end for t, end in self._sessions.items() if end > now}
            self._sessions[token] = now + self.session_ttl_s
            return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            end = self._sessions.get(token)
            if end is None:
                return False
            if end <= self.clock():
                del self._sessions[token]
                return False
            return True

    def logout(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)
