"""gaming root: games and GPU bits on the desktop. No data yet."""
