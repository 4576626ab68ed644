"""Model registry: register, promotion gates, aliases, audit trail and rollback."""
