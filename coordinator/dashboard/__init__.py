"""What the MID's operator and a job's buyer look at: the job report (one self-contained HTML file) and the operator
dashboard served beside the coordinator's API, behind the operator's login. Every number is read from the ledger (and
for a job's per-round accuracy, from the job book `job start` wrote); charts are inline SVG (protocol.svg_charts)."""
