"""Who may call guard and what they may do: API keys, tenants, per-tenant limits.

Both doors (gRPC and HTTP) ask the same `AccessControl`; neither knows the key file format.
"""

from guard.access.control import AccessControl, Tenant
from guard.access.keys import hash_key, new_key

__all__ = ["AccessControl", "Tenant", "hash_key", "new_key"]
