"""The member's controls over one membership: durable choices on the device (state), what they mean for jobs and
heartbeats (decisions), the running daemon's view of them (watch), and the commands that change them (commands)."""
