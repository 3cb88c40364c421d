"""Routing and dispatch: float32 routers and their losses (`routers`, `losses`), moving tokens to experts and back
(`dispatch`), what routed layers report (`statistics`) and what routing carries between steps (`state`)."""
