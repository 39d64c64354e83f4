"""The buyers' market: registered buyers, signed requests, jobs from request to delivered model (issue 18)."""
