"""Training losses (torch only)."""
