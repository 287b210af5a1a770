"""work root: work tooling on the desktop and laptop. No data yet."""
