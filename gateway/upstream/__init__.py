"""Talking to TokenHub.

    client   the Upstream protocol, Reply, HttpUpstream on aiohttp, the key scrubber
    keypool  KeyPool: which key next, its health kept in the store, probes
    calls    one call with one key: counted, timed and fed to the key's health

May import: store, policy and the shared nouns; not delivery, openai or simulator.
"""
