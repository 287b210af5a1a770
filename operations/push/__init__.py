"""The push flow, one module a step: plan, build, copy (sign + copy), activate (dry-activate,
activate, verify). ``commands`` holds the Nix commands and facts the steps share."""
