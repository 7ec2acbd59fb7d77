"""The shared store: replicas share one Redis (standalone, Sentinel or Cluster).

    store    RedisStore: the Store protocol over Lua scripts, one round trip per admission
    scripts  the Lua scripts; prelude the helpers every script runs after
    codec    Task records as hashes
    ledger   listings, ledger rows and pruning (mixed into RedisStore)
    calls    connections, retries and error mapping
    pipe     pipelined calls
    url      the redis:// URL grammar (config reads it too)
    outbox   the outbox's keys and scripts

May import: store.base, store.outbox, policy and the shared nouns.
"""
