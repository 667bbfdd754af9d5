"""cwm's Python side: a control-protocol client (stdlib only) and the vLLM KV connector.

The connector lives in ``cwm_vllm.connector`` (it imports vLLM); the client does not.
"""

from .client import (  # noqa: F401
    Client,
    CwmError,
    CwmUnavailable,
    ERRORS,
    default_socket,
)

__all__ = ["Client", "CwmError", "CwmUnavailable", "ERRORS", "default_socket"]
