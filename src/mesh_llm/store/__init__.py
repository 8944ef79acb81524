"""SQL store: SQLAlchemy tables and schema migrations."""
