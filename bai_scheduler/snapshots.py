"""Session snapshots into private images (admin panel + REST API)."""


def handlers(prefix: str) -> list:
    return []
