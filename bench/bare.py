"""The baseline the hub is measured against: bare Flask doing the least the same job needs.

``POST /hooks/<name>`` parses the JSON body and answers 202; ``POST /api/process`` is the
seed article's endpoint (API key checked against a constant, the text result). Served by
gunicorn with the same settings as the hub, so the difference is the hub's own work.
"""

from __future__ import annotations

from flask import Flask, jsonify, request

API_KEY = "bench-bare-key"


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return jsonify({"status": "healthy"}), 200

    @app.post("/hooks/<name>")
    def hook(name: str):
        request.get_json(force=True)
        return jsonify({"id": "evt_bare", "status": "pending"}), 202

    @app.post("/api/process")
    def process():
        if request.headers.get("X-API-Key") != API_KEY:
            return jsonify({"error": "Invalid API key"}), 401
        data = request.get_json()
        if not data or "input" not in data:
            return jsonify({"error": "Missing required field: input"}), 400
        text = data["input"]
        result = {"processed": text.upper(), "length": len(text), "words": len(text.split())}
        return jsonify({"success": True, "result": result, "input": text}), 200

    return app
