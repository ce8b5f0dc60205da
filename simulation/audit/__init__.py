"""Privacy audits of a run: membership inference, and the canary audit of both stages with its one-run epsilon bound."""
