"""Governance: keys, signatures, tiers, votes, kill switch, audit chain and phases."""
