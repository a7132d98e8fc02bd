"""What one session may cost: bounds on its tensors, checked before anything is allocated.

A request body is already bounded (OPTSERVE_MAX_BODY_BYTES, and the decoders never allocate more
than the body holds), but a new session's zero-initialised `tensors` are only declared: a shape
of [100000, 100000] in a 60-byte body would allocate 40 GB. So the shapes are checked here,
as numbers, before `np.zeros` ever runs. A session's shapes are fixed at creation (a push, PUT
params or PUT state must match them), so creation is the one place they need checking.

Status codes: past a size bound (elements) is 413 `too_many_elements`; past a count bound is 422
`too_many_tensors` / `too_many_sessions`; a bad tensor name is 422 `invalid_session` (the code
tensor names always had). Each problem names the setting that sets the bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import EngineError, invalid_session

#: Tensor names: letters, digits and `_ . : / -` (torch's dotted names, Keras' `dense/kernel:0`).
#: Nothing else: no whitespace, no `,` (it separates `?names=a,b`), nothing a URL or a header
#: would need to escape. `/` is safe in state documents: they split `<tensor>/<state>` at the last
#: `/`, and state names never hold one.
TENSOR_NAME = re.compile(r"[A-Za-z0-9_.:/-]+")


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds of the settings of the same names (config.py)."""

    max_tensors_per_session: int = 10_000
    max_elements_per_tensor: int = 2**28
    max_elements_per_session: int = 2**29
    max_tensor_name_length: int = 256
    max_sessions_per_tenant: int = 1_000

    def check_name(self, name: object) -> str:
        """A tensor name, or 422 `invalid_session` saying what is wrong with it."""
        if not isinstance(name, str) or not 0 < len(name) <= self.max_tensor_name_length:
            raise invalid_session(
                f"tensor name {name!r} must be 1 to {self.max_tensor_name_length} characters "
                "(OPTSERVE_MAX_TENSOR_NAME_LENGTH)"
            )
        if TENSOR_NAME.fullmatch(name) is None:
            raise invalid_session(
                f"tensor name {name!r} may hold only letters, digits and _ . : / -"
            )
        if name == "__metadata__":  # the safetensors header's own entry
            raise invalid_session("tensor name '__metadata__' is reserved")
        return name

    def check_session(self, shapes: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        """The tensors of a new session (name, shape), before any of them is allocated."""
        shapes = list(shapes)
        if len(shapes) > self.max_tensors_per_session:
            raise EngineError(
                "too_many_tensors",
                f"{len(shapes)} tensors; a session holds at most {self.max_tensors_per_session}",
                limit=self.max_tensors_per_session,
                setting="OPTSERVE_MAX_TENSORS_PER_SESSION",
            )
        total = 0
        for name, shape in shapes:
            self.check_name(name)
            # A zero-length dimension makes no elements but does not make the others free:
            # numpy refuses [0, 2**70] and so do we, by the extent of the non-zero dimensions.
            extent = math.prod(max(d, 1) for d in shape)
            if extent > self.max_elements_per_tensor:
                raise EngineError(
                    "too_many_elements",
                    f"tensor {name!r} of shape {list(shape)} is over the limit of "
                    f"{self.max_elements_per_tensor} elements per tensor",
                    tensor=name,
                    limit=self.max_elements_per_tensor,
                    setting="OPTSERVE_MAX_ELEMENTS_PER_TENSOR",
                )
            total += math.prod(shape)
        if total > self.max_elements_per_session:
            raise EngineError(
                "too_many_elements",
                f"the session's tensors hold {total} elements, over the limit of "
                f"{self.max_elements_per_session} per session",
                limit=self.max_elements_per_session,
                setting="OPTSERVE_MAX_ELEMENTS_PER_SESSION",
            )

    def too_many_sessions(self, tenant: str) -> EngineError:
        return EngineError(
            "too_many_sessions",
            f"tenant {tenant!r} already has {self.max_sessions_per_tenant} sessions; delete one "
            "first",
            limit=self.max_sessions_per_tenant,
            setting="OPTSERVE_MAX_SESSIONS_PER_TENANT",
        )
