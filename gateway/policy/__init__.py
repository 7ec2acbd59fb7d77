"""The rules, pure: no I/O, and no aiohttp, starlette, redis or sqlite3 import. Tested with tables of cases.

    auth        gateway keys: hashing, constant-time lookup, models a user may use
    quota       budgets and rate limits: subjects, periods, the admission check
    pricing     estimates and actual costs of a video
    validation  Seedance 2.0's limits on a create body
    keyhealth   an upstream key's health: how replies change it, which key to choose

May import: the shared nouns only.
"""
