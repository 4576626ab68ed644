"""Network architectures (torch only)."""
