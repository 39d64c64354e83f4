"""The contract both sides import: identities, signed envelopes, message models, topics, ledger proof verification.

No network or database I/O happens here; docs/protocol.md describes the wire format module by module. Import the
modules themselves (`protocol.envelope`, `protocol.messages`, ...): this package re-exports nothing, so importing one
part never pulls in the others (and `protocol.tasks` alone imports torch).
"""
