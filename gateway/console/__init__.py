"""The web console at /console/ (SPEC §16): server-rendered pages for members, team admins and the operator.

    routes    the paths under /console and the roles that may open each
    pages     what every page shares: the visitor, roles, CSRF checks, templates, errors, security headers
    sessions  sign-in sessions kept in the store, CSRF tokens, the checks that end a session
    signin    the sign-in form (a gateway key or the admin token) and sign-out
    throttle  failed sign-ins counted per client address
    member    overview, tasks, a task's page, archived videos and covers
    team      a team admin's users and keys: issue, revoke, rotate
    operator  every team, upstream keys, webhooks, unknown outcomes (void/settle), the audit log, reload
    listing   a team's tasks filtered and paged; what a task's page shows
    figures   spend against budgets, per day, by model and by user, from the store's aggregates
    chart     bar charts drawn as SVG (pure)
    fmt       how figures are written (pure)
    templates/ static/   the Jinja2 templates; the stylesheet and the copy button's script (same origin)

May import: routes, http, flow, upstream, delivery, openai, store, policy and the shared nouns (it sits above
routes: it reuses the admin API's helpers, so that a change made here is made exactly as the API makes it).
"""
