"""The embedded store: one process holds the truth in a SQLite file.

    store         SQLiteStore: the Store protocol over one writer thread
    books         counters and in-flight counts, written once per transaction
    schema        tables, migrations and row mapping
    writer        the writer thread that batches operations into transactions
    checkpointer  a thread of its own that keeps the WAL bounded
    outbox        the outbox's tables
    ledger        listings, ledger rows and pruning (mixed into SQLiteStore)

May import: store.base, store.outbox, policy and the shared nouns.
"""
