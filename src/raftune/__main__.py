"""python -m raftune ... (same as the `raftune` command)."""
from raftune.cli import main

main()
