"""Scripts that a peer engine's own Python runs by path (`peer_worker.py`): they import nothing
of parallm, so the peer's environment (e.g. `.venv-peers` with vLLM, `make bench-peers`) needs
no parallm installed. parallm's side imports their torch-free helpers from here."""
