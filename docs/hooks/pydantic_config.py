"""griffe extension: a pydantic model's ``model_config`` is not part of its documented shape.

The API reference lists every field of the models (their names and types are the shapes the
tasks and flows return); ``model_config`` is how the model validates, not a field.
"""

from __future__ import annotations

from typing import Any

import griffe


class PydanticConfig(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if "model_config" in cls.members:
            cls.del_member("model_config")
