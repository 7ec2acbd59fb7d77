"""The route table: every path, its handler and its methods, the client routes under both prefixes."""

from __future__ import annotations

from starlette.routing import Route

from gateway.http.middleware import PREFIXES
from gateway.routes import admin, ops, tenancy, tenancy_keys, videos
from gateway.routes import generations as routes


def route_table() -> list[Route]:
    client = [
        ("/videos/generations", routes.create_task, ["POST"]),
        ("/videos/generations", routes.list_tasks, ["GET"]),
        ("/videos/generations/{task_id}", routes.get_task, ["GET"]),
        ("/videos/generations/{task_id}", routes.cancel_task, ["DELETE"]),
        ("/videos", videos.create_video, ["POST"]),
        ("/videos", videos.list_videos, ["GET"]),
        *((f"/videos/{feature}", videos.not_offered(feature), ["POST"]) for feature in videos.NOT_OFFERED),
        ("/videos/characters/{character_id}", videos.not_offered("characters"), ["GET"]),
        ("/videos/{video_id}", videos.get_video, ["GET"]),
        ("/videos/{video_id}", videos.delete_video, ["DELETE"]),
        ("/videos/{video_id}/content", videos.video_content, ["GET"]),
        ("/videos/{video_id}/remix", videos.remix_video, ["POST"]),
        ("/models", routes.list_models, ["GET"]),
        ("/usage", routes.usage, ["GET"]),
    ]
    table = [Route(prefix + path, fn, methods=methods) for prefix in PREFIXES for path, fn, methods in client]
    return table + [
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/admin/usage", admin.admin_usage, methods=["GET"]),
        Route("/admin/keys", admin.admin_keys, methods=["GET"]),
        Route("/admin/teams", admin.admin_teams, methods=["GET"]),
        *tenancy_routes(),
        Route("/admin/reload", admin.admin_reload, methods=["POST"]),
        Route("/admin/webhooks", admin.admin_webhooks, methods=["GET"]),
        Route("/admin/tasks/{task_id}/void", admin.admin_void_task, methods=["POST"]),
        Route("/admin/tasks/{task_id}/settle", admin.admin_settle_task, methods=["POST"]),
    ]


def tenancy_routes() -> list[Route]:
    """Teams, users, gateway keys and the audit log (SPEC §15)."""
    return [
        Route("/admin/teams", tenancy.create_team, methods=["POST"]),
        Route("/admin/teams/{name}", tenancy.get_team, methods=["GET"]),
        Route("/admin/teams/{name}", tenancy.change_team, methods=["PATCH"]),
        Route("/admin/teams/{name}", tenancy.delete_team, methods=["DELETE"]),
        Route("/admin/users", tenancy.list_users, methods=["GET"]),
        Route("/admin/users", tenancy.create_user, methods=["POST"]),
        Route("/admin/users/{name}", tenancy.get_user, methods=["GET"]),
        Route("/admin/users/{name}", tenancy.change_user, methods=["PATCH"]),
        Route("/admin/users/{name}", tenancy.delete_user, methods=["DELETE"]),
        Route("/admin/users/{name}/keys", tenancy_keys.issue, methods=["POST"]),
        Route("/admin/api-keys", tenancy_keys.list_keys, methods=["GET"]),
        Route("/admin/api-keys/{id}", tenancy_keys.revoke, methods=["DELETE"]),
        Route("/admin/audit", tenancy_keys.audit, methods=["GET"]),
    ]
