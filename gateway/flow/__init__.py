"""A task's life, knowing no HTTP.

    creates     admission, the forward to TokenHub with key failover, the task record (Tasks)
    polls       a client's poll: served from memory when terminal, else fetched and settled
    settlement  a terminal task's final cost, its books, its archive and webhook items
    poller      the background poller that settles tasks no client polls
    pacing      the poller's per-key polls-per-second budgets and its queue of leased due tasks
    retention   the ledger's retention: settled rows past `[ledger] retention_days` pruned in the background
    roster      this process's directory kept in step with the store's teams, users and keys
    alerts      budget alerts: what a settlement has the store check, and the log line and metric after

May import: upstream, delivery, store, policy and the shared nouns.
"""
