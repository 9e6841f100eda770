"""Browser pages of the scheduler service (sessions overview, admin panel)."""


def handlers(prefix: str) -> list:
    return []
