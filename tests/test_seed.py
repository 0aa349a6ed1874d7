"""The seed's API, as the article shows it, served by ordinary hub routes."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from hub.store.models import Attempt, Event


@pytest.fixture
def demo(app, db):
    from hub.services.routes import ensure_demo_routes

    with db.session() as session:
        assert ensure_demo_routes(session, app.extensions["hub.connectors"]) == ["process", "chat"]


def test_health(client):
    response = client.get("/health")
    assert (response.status_code, response.json) == (200, {"status": "healthy"})


def test_process_returns_the_articles_shape(client, key, demo, db):
    response = client.post(
        "/api/process", json={"input": "hello brave new world"}, headers={"X-API-Key": key}
    )
    assert response.status_code == 200
    assert response.json == {
        "success": True,
        "result": {"processed": "HELLO BRAVE NEW WORLD", "length": 21, "words": 4},
        "input": "hello brave new world",
    }
    with db.session() as session:
        event = session.scalar(select(Event))
        attempt = session.scalar(select(Attempt))
    assert (event.route, event.status, event.path) == ("process", "delivered", "/api/process")
    assert (attempt.connector, attempt.outcome) == ("text", "ok")


def test_process_without_input_is_400(client, key, demo, db):
    response = client.post("/api/process", json={"text": "x"}, headers={"X-API-Key": key})
    assert response.status_code == 400
    assert response.json["error"] == "Missing required field: input"
    with db.session() as session:
        event = session.scalar(select(Event))
    assert (event.status, event.reason) == ("rejected", "missing_field")


def test_process_with_wrong_key_is_401(client, demo):
    response = client.post("/api/process", json={"input": "x"}, headers={"X-API-Key": "nope"})
    assert response.status_code == 401
    assert response.json["error"] == "Invalid API key"


def test_chat_without_message_is_400(client, key, demo):
    response = client.post("/api/chat", json={}, headers={"X-API-Key": key})
    assert response.status_code == 400
    assert response.json["error"] == "Message is required"


def test_chat_without_openai_key_is_500_not_configured(client, key, demo, db):
    response = client.post("/api/chat", json={"message": "hi"}, headers={"X-API-Key": key})
    assert response.status_code == 500
    assert response.json["error"] == "API key not configured"
    with db.session() as session:
        event = session.scalar(select(Event))
        attempt = session.scalar(select(Attempt))
    assert event.status == "failed"
    assert (attempt.connector, attempt.outcome) == ("openai", "permanent")


def test_unknown_endpoint_is_json_404(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json == {"error": "Endpoint not found", "code": "not_found"}


def test_ready_when_schema_is_current(client, app):
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json["status"] == "ready"


def test_not_ready_when_schema_is_behind(client, db):
    from sqlalchemy import text

    with db.engine.begin() as conn:
        head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        conn.execute(text("UPDATE alembic_version SET version_num = 'old'"))
    try:
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json["code"] == "schema_outdated"
    finally:  # the PostgreSQL database is shared by the session: put its head back
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head})


def test_not_ready_when_database_is_unreachable(tmp_path):
    from hub import create_app

    missing = tmp_path / "no-such-dir" / "hub.db"
    app = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{missing}", "SECRET_KEY": "x"})
    response = app.test_client().get("/ready")
    assert response.status_code == 503
    assert response.json["code"] == "database_unavailable"
    assert "sqlite" not in response.get_data(as_text=True).lower()
