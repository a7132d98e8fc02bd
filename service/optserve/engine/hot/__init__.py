"""The hot engine: each session lives in the memory of the one process that owns it; Redis keeps
a log of every acknowledged push and a periodic snapshot, from which any replica recovers it
exactly (OPTSERVE_ENGINE=hot; see service.py)."""
