"""Mosquitto password file entries in its PBKDF2 format, written without needing `mosquitto_passwd` on the host.

Mosquitto 2.x reads `user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt)>`; this is what
`mosquitto_passwd -b` writes with 101 iterations and a 12-byte salt (checked against mosquitto 2.0.11).
"""

from __future__ import annotations

import base64
import hashlib
import secrets

PBKDF2_ITERATIONS = 101
SALT_SIZE = 12


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The `$7$...` hash of `password` for a mosquitto password file."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_SIZE)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def new_password() -> str:
    """A random broker password with 192 bits of entropy."""
    return secrets.token_urlsafe(24)
