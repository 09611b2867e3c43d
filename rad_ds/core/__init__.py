"""The ground floor shared by every stage: mechanisms that exist once (shared caches, ...)."""
