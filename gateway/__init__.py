"""tokenhub-gateway: an OpenAI-style reverse proxy in front of TokenHub's Seedance 2.0 video API.

The map, from the entry points down. A module may import what is below it, never what is above it
(`scripts/check` runs import-linter over the contract in pyproject.toml):

    cli, supervisor, serve   entry points: the command line (admin_cli: `admin …`, over HTTP), `serve --workers N`,
                             the uvicorn server
    app                      the composition root: builds the Gateway, the ASGI app and its lifespan
    console/                 the web console at /console/: server-rendered pages over routes' helpers
    routes/                  what each path does, named by URL: TokenHub shape, OpenAI shape, admin, ops
    http/ | flow/            how bytes become requests and answers | a task's life: create, poll, settle
    upstream/ | delivery/ | openai/ | simulator/
                             TokenHub client and key pool | archive, webhooks, downloads |
                             OpenAI's Videos shape (pure) | the TokenHub stand-in
    store/                   the store protocol; sqlite/ and redis/ behind it
    policy/                  the rules, pure: auth, quota, pricing, validation, key health

Shared nouns, importable from anywhere and importing no folder: config (with config_delivery, its
[[webhooks]] and [archive] sections), readers, errors, context, ids, logs, metrics, money, tokenhub (TokenHub's
API as data). The one allowed exception: config reads the Redis URL grammar from store/redis/url.py.
"""
