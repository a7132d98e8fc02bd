"""Redis storage for sessions: key layout, atomic load/commit, and the embedded Valkey server."""
