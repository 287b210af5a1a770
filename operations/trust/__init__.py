"""Keys, host keys, SSH and secrets: who trusts whom, and what is decrypted."""
