"""Flat flow parameters described by a pydantic model: one owner for names, defaults,
constraints and descriptions.

Prefect merges a deployment's parameters with a run's overrides *at the top level only*: a
nested model passed as one parameter is replaced whole by ``--param`` or the UI's custom run,
silently dropping the deployment's other defaults. So the deployed flows take flat parameters,
one per field of their request model (``CollectionRequest``, ``SharingRequest``), and build the
model when a run starts: its validators (cross-field rules included) then reject a bad request
before any server is touched, and ``python -m prefect_orthanc.deployments check`` runs the same
validation on prefect.yaml.

``described_by(Model)`` writes the model's field descriptions into the flow's docstring
``Args:`` section, where Prefect reads parameter descriptions for the UI form.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = ["InvalidParameters", "brief_errors", "described_by", "request_from", "request_model"]

F = TypeVar("F", bound=Callable[..., Any])
_MODEL_ATTRIBUTE = "__request_model__"


class InvalidParameters(SafeMessageError, ValueError):
    """A flow's parameters do not make a valid request: names each bad parameter and what is
    wrong with it, never its value."""


def described_by(model: type[BaseModel], **more: str) -> Callable[[F], F]:
    """Decorator (under ``@flow``): append an ``Args:`` section describing every parameter of
    the function from ``model``'s field descriptions (``more`` for parameters not in the
    model), and remember the model for ``request_model``."""

    def decorate(fn: F) -> F:
        lines = []
        for name in inspect.signature(fn).parameters:
            field = model.model_fields.get(name)
            text = field.description if field is not None else more.get(name)
            if not text:
                raise TypeError(f"{fn.__name__}: parameter {name} has no description")
            lines.append(f"    {name}: {' '.join(text.split())}")
        doc = inspect.cleandoc(fn.__doc__ or "")
        fn.__doc__ = doc + "\n\nArgs:\n" + "\n".join(lines) + "\n"
        setattr(fn, _MODEL_ATTRIBUTE, model)
        return fn

    return decorate


def request_model(flow_or_fn: Any) -> type[BaseModel] | None:
    """The model a flow's parameters were described by, if any."""
    fn = getattr(flow_or_fn, "fn", flow_or_fn)
    return getattr(fn, _MODEL_ATTRIBUTE, None)


def brief_errors(error: ValidationError) -> str:
    """A validation error in one line, ``field: message`` pairs, without the input values."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def request_from(model: type[BaseModel], values: Mapping[str, Any]) -> Any:
    """``model`` from the flow's parameters (those it has fields for; ``None`` means the
    model's default); ``InvalidParameters`` (a ``ValueError``) with a one-line message naming
    each bad parameter, never its value."""
    try:
        return model.model_validate({k: v for k, v in values.items()
                                     if k in model.model_fields and v is not None})
    except ValidationError as error:
        raise InvalidParameters(brief_errors(error)) from None
