"""common root: the everyday CLI tooling of every real machine (not the ISO). No data yet."""
