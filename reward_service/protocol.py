"""The HTTP reward protocol, shared by the client (``reward_service.remote``) and the server
(``reward_service.server``): one POST per batch of samples, one score per sample back.

Request::

    POST <url>
    Authorization: Bearer <token>
    {"samples": [{"prompt": "3+4=", "response": "7", "label": "7"}, ...]}

Response (200)::

    {"scores": [1.0, null, ...]}    # one per sample, in order; null = unscorable

Both sides validate strictly: a string where a number belongs is an error, never coerced.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_SAMPLES_PER_REQUEST = 4096
"""The most samples the server takes in one request; the client's batches must fit."""


class Sample(BaseModel):
    """One sample to score: the decoded prompt and response, and the row's label (may be null)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str
    response: str
    label: str | None = None


class ScoreRequest(BaseModel):
    """The request body: the samples of one batch."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    samples: list[Sample] = Field(max_length=MAX_SAMPLES_PER_REQUEST)


class ScoreResponse(BaseModel):
    """The response body: ``scores[i]`` scores ``samples[i]``; null (or NaN/inf, which the client
    also reads as null) means unscorable. The length must equal the request's sample count."""

    model_config = ConfigDict(strict=True, frozen=True)

    scores: list[float | None]
