"""The embedded store: one process holds the truth in a SQLite file.

    store         SQLiteStore: the Store protocol over one writer (looped or writer, by synchronous)
    books         counters and in-flight counts, written once per transaction
    schema        tables, migrations and row mapping
    transactions  a batch of operations in one transaction; a failing one fails alone
    looped        synchronous=NORMAL: batches run on the event loop's thread, one per loop iteration
    writer        synchronous=FULL: batches run on a writer thread of their own
    checkpointer  a thread of its own that keeps the WAL bounded
    outbox        the outbox's tables
    ledger        listings, ledger rows and pruning (mixed into SQLiteStore)
    rollup        the ledger's per-day and per-month figures, kept by triggers as rows settle; the backfill
    figures       grouped figures from those and the few rows they do not cover
    reader        a read-only connection on a thread of its own, for figures, pages and listings
    tenancy       teams, users, gateway keys, the audit log and the roster version (tenancy_reads: reads)
    budget        budget alerts' once-per-period marks, checked by the step that settles
    sessions      console sessions (mixed into SQLiteStore)

May import: store.base, store.outbox, policy and the shared nouns.
"""
