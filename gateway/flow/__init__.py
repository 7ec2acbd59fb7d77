"""A task's life, knowing no HTTP.

    creates     admission, the forward to TokenHub with key failover, the task record (Tasks)
    polls       a client's poll: served from memory when terminal, else fetched and settled
    settlement  a terminal task's final cost, its books, its archive and webhook items
    poller      the background poller that settles tasks no client polls

May import: upstream, delivery, store, policy and the shared nouns.
"""
