"""The MID's task catalogue: the specs the operator approved, signed with the MID key, served to devices and buyers."""
