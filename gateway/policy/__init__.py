"""The rules, pure: no I/O, and no aiohttp, starlette, redis or sqlite3 import. Tested with tables of cases.

    auth        gateway keys: hashing, constant-time lookup, models a user may use
    quota       budgets and rate limits: subjects, periods, the admission check
    pricing     estimates and actual costs of a video
    validation  Seedance 2.0's limits on a create body
    keyhealth   an upstream key's health: how replies change it, which key to choose
    directory   the teams, users and gateway keys in force: the config's over the store's roster
    roles       who may do what on the admin routes: the operator, a team admin, a member

May import: the shared nouns only.
"""
