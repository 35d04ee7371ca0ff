"""raftune: domain fine-tuning of instruction-tuned LLMs that keeps their general abilities (RAFT)."""
__version__ = "0.1.0"
