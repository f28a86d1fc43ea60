"""Stage entry points: each reads a config (and maybe an --init run) and writes a run dir."""
