"""What each path does, named by URL (someone holding a URL finds the file).

    generations   /videos/generations*, /models, /usage: the TokenHub shape
    videos        /videos*: the OpenAI shape (create, list, retrieve, delete, content, remix)
    videos_input  the JSON or multipart fields of a /videos create
    admin         /admin/*: the ledger, upstream keys, the list of teams, reloads, resolutions, webhooks
    access        who calls an admin route, and what its role lets it do
    tenancy       /admin/teams/{name}, /admin/users*: teams and users at runtime (tenancy_bodies: their bodies)
    tenancy_keys  /admin/users/{name}/keys, /admin/api-keys*, /admin/audit
    ops           /healthz, /readyz, /metrics
    ledger        ledger rows as JSON, CSV or a table (admin and the `usage` command)
    table         the route table: every path and its handler, under both prefixes

May import: http, flow, upstream, delivery, openai, store, policy and the shared nouns.
"""
