"""How bytes become a request and a response; knows no task's life.

    asgi        GatewayApp: the Starlette app, its hot-route dispatch and error handlers
    middleware  request id, the canonical log line, request metrics, the draining 503
    protocol    uvicorn's HTTP protocol: the slow-client deadlines, the drain, clients that leave
    request     helpers for handlers: headers, bodies, JSON, authentication, parameters, answers
    bodies      strict JSON and the checked create body
    workers     BodyWorkers: large bodies parsed in worker processes (`python -m gateway.http.workers FD`)

May import: policy and the shared nouns (the Gateway's type only under TYPE_CHECKING).
"""
