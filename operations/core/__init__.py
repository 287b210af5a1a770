"""Values and seams: what every other floor stands on (no pyinfra deploy state)."""
