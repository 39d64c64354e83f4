"""Provenance manifests of delivered models (protocol/provenance.py is the format and its offline verification):
building and signing them from the log, and the shelf of manifests the MID issued."""
