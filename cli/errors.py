"""Which library errors are the user's to fix (printed as one line) rather than bugs (traceback)."""

from __future__ import annotations

import json


def user_facing(error: BaseException) -> str | None:
    """The one-line message for an input/usage error, or None for an unexpected one."""
    user_error_types: list[type[BaseException]] = [FileNotFoundError, json.JSONDecodeError]
    try:
        from eraser.errors import EraserError

        user_error_types.append(EraserError)
    except ImportError:
        pass
    try:
        from tenants.errors import TenantError

        user_error_types.append(TenantError)
    except ImportError:
        pass
    try:
        import pydantic

        user_error_types.append(pydantic.ValidationError)
    except ImportError:
        pass
    if not isinstance(error, tuple(user_error_types)):
        return None
    errors = getattr(error, "errors", None)
    if callable(errors) and type(error).__name__ == "ValidationError":  # pydantic: one line per field
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'input'}: {e.get('msg')}" for e in errors())
    return str(error)
