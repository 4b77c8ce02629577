"""Ray Tune search: the space language (space), a trial (trial), the results (report), the command (cli)."""
