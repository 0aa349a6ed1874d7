"""The seed's API, POST /api/process and /api/chat: the same hub underneath (the routes
``process`` and ``chat``), the seed article's request and response shapes and errors."""

from __future__ import annotations

from flask import Blueprint, Request

from hub.services import intake, pipeline
from hub.web.errors import error_response
from hub.web.hooks import (
    ANY_METHOD,
    answer,
    enqueue,
    give_back_sync_slot,
    incoming,
    refused_at_commit_response,
    run_sync,
    sync_busy_response,
)

bp = Blueprint("seed", __name__)
bp.teardown_request(give_back_sync_slot)
bp.register_error_handler(intake.SyncBusy, sync_busy_response)
bp.register_error_handler(intake.RefusedAtCommit, refused_at_commit_response)


@bp.route("/api/process", methods=ANY_METHOD)
def api_process():
    return process(incoming("process"))


def process(came: intake.Incoming, req: Request | None = None):
    """A request for /api/process, answered as a Flask view answers (hub/web/lane.py
    answers a POST the same way without Flask's request context: ``req`` is its request)."""
    accepted = intake.accept(came)
    if isinstance(accepted, intake.Answer):
        return answer(accepted)
    data = accepted.payload
    if not isinstance(data, dict) or "input" not in data:
        return answer(
            intake.refuse_accepted(accepted, 400, "Missing required field: input", "missing_field")
        )
    if accepted.route.mode == "async" or intake.waits_for_resume(accepted):
        return enqueue(accepted, req, task_id=accepted.event.id)
    outcome = run_sync(accepted)
    if outcome.status == pipeline.DELIVERED:
        return {"success": True, "result": outcome.result, "input": data["input"]}, 200
    return error_response(
        intake.failure_status(outcome),
        outcome.error,
        outcome.code or "step_failed",
        id=accepted.event.id,
    )


# The seed's chat errors, by the failure's code.
CHAT_ERRORS = {
    "not_configured": (500, "API key not configured"),
    "bad_response": (500, "Unexpected API response format"),
    # The hub's own fault, not the upstream's: the seed's catch-all sentence.
    "bad_config": (500, "Unknown error occurred"),
    "connector_bug": (500, "Unknown error occurred"),
    "internal_error": (500, "Unknown error occurred"),
}


def chat_failure(outcome: pipeline.Outcome) -> tuple[int, str, str]:
    """(status, sentence, code) of a chat run that did not deliver, as the seed answered;
    a message that doesn't fit the step is the sender's mistake (422)."""
    if outcome.code in ("bad_input", "template_limit"):
        return 422, outcome.error or "Unprocessable request", outcome.code
    if outcome.code in CHAT_ERRORS:
        status, sentence = CHAT_ERRORS[outcome.code]
        return status, sentence, outcome.code or "error"
    if outcome.code == "timeout" or outcome.code == "upstream_timeout":
        return 504, "API request timed out", "timeout"
    return 502, outcome.error or "API request failed", "upstream_error"


@bp.route("/api/chat", methods=ANY_METHOD)
def api_chat():
    accepted = intake.accept(incoming("chat"))
    if isinstance(accepted, intake.Answer):
        return answer(accepted)
    data = accepted.payload
    message = data.get("message") if isinstance(data, dict) else None
    if not message:
        return answer(intake.refuse_accepted(accepted, 400, "Message is required", "missing_field"))
    if accepted.route.mode == "async" or intake.waits_for_resume(accepted):
        return enqueue(accepted, task_id=accepted.event.id)
    outcome = run_sync(accepted, status_of=lambda o: chat_failure(o)[0])
    if outcome.status == pipeline.DELIVERED:
        result = outcome.result if isinstance(outcome.result, dict) else {}
        return {
            "success": True,
            "user_message": message,
            "assistant_message": result.get("assistant_message"),
            "tokens_used": result.get("tokens_used"),
        }, 200
    status, sentence, code = chat_failure(outcome)
    return error_response(status, sentence, code, id=accepted.event.id)
