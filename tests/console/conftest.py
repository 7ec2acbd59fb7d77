"""The store contract fixtures (tests/store/conftest.py): the console's store operations run on SQLite, in both
of its write paths, and on a real Redis."""

from tests.store.conftest import redis_url, replicas, store

__all__ = ["redis_url", "replicas", "store"]
