"""minimal root: the base every machine and image gets (boot, users, SSH). No data yet."""
