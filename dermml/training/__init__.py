"""The shared training loop and checkpointing (torch only)."""
