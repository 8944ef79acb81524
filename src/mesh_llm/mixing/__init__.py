"""Pure mixing maths: combine, sample and constrain sparse next-token distributions (numpy only)."""
