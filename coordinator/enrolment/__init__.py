"""Enrolment: a signed invite and a self-signed request become a device membership (docs/messaging.md)."""
