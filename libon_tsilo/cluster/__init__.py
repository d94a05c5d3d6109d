"""Several nodes as one server: Path entries with flow tokens, and the relay of forks over our flows."""
