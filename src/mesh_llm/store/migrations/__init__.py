"""Schema migrations, one module per version: vNNN_name.py with VERSION, DESCRIPTION and upgrade(op)."""
