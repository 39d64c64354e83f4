"""The MID's policy, one TOML file: fee, knob curve and bounds, settlement rules, minimum reputation per job class,
strike quorum, purpose vocabulary (W3C DPV) with licence terms, leave defaults. Every change is a POLICY leaf
(`ledger_records`); quotes take the version current when they are made, settlements the version their job ran under.
"""
