"""The store: SQLAlchemy models and one repository module per table group, the engines and
migrations, and the notifications of committed changes (to this process and the replicas)."""
