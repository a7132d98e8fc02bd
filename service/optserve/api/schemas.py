"""OpenAPI documentation of the bodies. Routes never parse tensors with these models (orjson and
numpy do, DESIGN.md): the models describe the contract for /docs and generated clients."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..wire import JSON, SAFETENSORS


class Tensor(BaseModel):
    shape: list[int] = Field(description="Dimensions; [] is a scalar")
    data: list[float] = Field(description="prod(shape) numbers, flat, row-major, float32")


class TensorDecl(BaseModel):
    shape: list[int]
    dtype: Literal["float32"] = "float32"


class Optimizer(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(
        description="sgd, adam, adamw, rmsprop, adagrad, nadam, radam, adamax or lion; every "
        "other member is a torch.optim hyperparameter of it (lr, betas, eps, weight_decay, ...)"
    )


class Mode(BaseModel):
    type: Literal["async", "sync"] = "async"
    workers: int | None = Field(default=None, ge=1, description="sync: pushes per round")
    timeout_s: float | None = Field(
        default=None, gt=0, description="sync: a round closes this long after its first push"
    )
    min_workers: int | None = Field(
        default=None, ge=1, description="sync: fewest pushes a timed-out round may apply"
    )


TTL_DOC = (
    "Idle lifetime in seconds: unused this long, the session and all its keys are deleted; any "
    "push, pull, read or write renews it. null: never expires"
)


class SessionCreate(BaseModel):
    optimizer: Optimizer
    params: dict[str, Tensor] = Field(default_factory=dict, description="Initial values")
    tensors: dict[str, TensorDecl] = Field(
        default_factory=dict, description="Zero-initialised tensors, to upload later"
    )
    mode: Mode = Field(default_factory=Mode)
    lr_schedule: dict[str, Any] | None = Field(
        default=None,
        description="constant, step, multistep, exponential, cosine, linear or sequence, with "
        "torch.optim.lr_scheduler's parameter names",
    )
    clip_grad_norm: float | None = Field(default=None, gt=0)
    nonfinite: Literal["reject", "skip"] = "reject"
    max_staleness: int | None = Field(
        default=None, ge=0, description="Pushes whose base_version is further behind are stale"
    )
    staleness: Literal["reject", "scale"] = Field(
        default="reject", description="Stale pushes: 409 stale_gradient, or lr / (1 + staleness)"
    )
    ttl_s: float | None = Field(
        default=None, ge=0.1, description=f"{TTL_DOC} (default: OPTSERVE_SESSION_TTL_S)"
    )
    name: str | None = None


class Session(BaseModel):
    id: str
    name: str | None
    version: int
    optimizer: dict[str, Any]
    tensors: dict[str, TensorDecl]
    mode: Mode
    lr_schedule: dict[str, Any] | None
    lr: float = Field(description="The lr the next update uses")
    clip_grad_norm: float | None
    nonfinite: Literal["reject", "skip"]
    max_staleness: int | None
    staleness: Literal["reject", "scale"]
    ttl_s: float | None = Field(description=TTL_DOC)
    created_at: str
    updated_at: str


class SessionList(BaseModel):
    sessions: list[Session]


class SessionPatch(BaseModel):
    optimizer: dict[str, Any] | None = Field(default=None, description="Hyperparameters to change")
    clip_grad_norm: float | None = None
    nonfinite: Literal["reject", "skip"] | None = None
    max_staleness: int | None = None
    staleness: Literal["reject", "scale"] | None = None
    ttl_s: float | None = Field(default=None, ge=0.1, description=TTL_DOC)
    name: str | None = None


class Params(BaseModel):
    version: int
    params: dict[str, Tensor]


class ParamsPut(BaseModel):
    params: dict[str, Tensor]


class Version(BaseModel):
    version: int


class GradientPush(BaseModel):
    grads: dict[str, Tensor] = Field(description="Any subset of the tensors; absent = skipped")
    base_version: int | None = Field(default=None, ge=0)
    worker: str | None = None


class PushResponse(BaseModel):
    version: int
    applied: bool
    skipped: str | None = None
    total_norm: float | None = Field(default=None, description="Pre-clip global norm")
    staleness: int | None = Field(default=None, description="Versions behind, if base_version")
    params_version: int | None = Field(
        default=None, description="On a replay: the (current) version of the params returned"
    )
    lr: float | None = Field(default=None, description="The lr the next update will use")
    round: int | None = Field(default=None, description="sync: the round this push joined")
    round_workers: int | None = Field(default=None, description="sync: pushes in that round")
    params: dict[str, Tensor]


class State(BaseModel):
    version: int
    optimizer: dict[str, Any]
    lr_schedule: dict[str, Any] | None
    lr_schedule_state: dict[str, Any]
    tensors: dict[str, dict[str, Tensor | float]] = Field(
        description="Per tensor: param, torch's state names (step, exp_avg, ...)"
    )


class StatePut(BaseModel):
    tensors: dict[str, dict[str, Tensor | float]]
    optimizer: dict[str, Any] | None = None
    lr_schedule_state: dict[str, Any] | None = None


class Problem(BaseModel):
    """RFC 9457 problem details, plus our stable `code` and any members naming the cause."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable error code, e.g. session_not_found, non_finite")
    request_id: str | None = Field(
        default=None, description="The request's id, as in the X-Request-ID response header"
    )


_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
#: Error responses of every /v1 route (problem+json, never FastAPI's default validation shape).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": description, "content": _PROBLEM}
    for status, description in (
        (400, "Malformed body"),
        (401, "Missing or invalid API key (WWW-Authenticate: Bearer)"),
        (404, "No such session (or another tenant's)"),
        (413, "Body, tensor or session too large"),
        (415, "Unsupported media type"),
        (422, "Invalid request"),
        (429, "Rate limited (Retry-After)"),
        (503, "Store, session owner or (behind the proxy) every replica unavailable (Retry-After)"),
    )
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
TENSOR_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {SAFETENSORS: _BINARY}}}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace pydantic's local `#/$defs/X` references by the definitions themselves."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def body(model: type[BaseModel], tensors_in: str | None = None) -> dict[str, Any]:
    """`openapi_extra` for a body read by hand: the JSON schema, plus safetensors if it carries
    tensors (named tensors; the other fields as JSON texts in the header metadata)."""
    schema = model.model_json_schema()
    content: dict[str, Any] = {JSON: {"schema": _inline(schema, schema.get("$defs", {}))}}
    if tensors_in:
        content[SAFETENSORS] = _BINARY
    return {"requestBody": {"required": True, "content": content}}
