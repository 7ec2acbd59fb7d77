"""The shared store: replicas share one Redis (standalone, Sentinel or Cluster).

    store    RedisStore: the Store protocol over Lua scripts, one round trip per admission
    scripts  the Lua scripts; prelude the helpers every script runs after
    codec    Task records as hashes
    ledger   listings, ledger rows and pruning (mixed into RedisStore)
    rollup   the ledger's per-day and per-month figures, written by the scripts that settle; the backfill
    aggregate  grouped figures from those and the few rows they do not cover
    calls    connections, retries and error mapping
    pipe     pipelined calls
    url      the redis:// URL grammar (config reads it too)
    outbox   the outbox's keys and scripts
    tenancy  teams, users, gateway keys, the audit log and the roster version (tenancy_reads: reads)
    budget   budget alerts' Lua, run by SETTLE and BUDGET_CHECK
    sessions console sessions, each a string that expires with it

May import: store.base, store.outbox, policy and the shared nouns.
"""
