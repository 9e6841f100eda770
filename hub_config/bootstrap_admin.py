"""Create the first admin's login on first run, with a random password.

No well-known default password exists: the password is generated once,
written to $BAI_DATA_DIR/admin-password (mode 600) and printed here.  The
admin changes it at /hub/change-password after logging in.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import bcrypt
from jupyterhub import orm
from nativeauthenticator.orm import UserInfo  # registers users_info in the hub's schema


def ensure_account(db_url: str, username: str, password: str, authorized: bool = True) -> bool:
    """Add a NativeAuthenticator login; False if the name already has one.

    Goes through JupyterHub's own session factory, so a new database gets the
    hub's full schema and migration stamp (the hub then starts on it as its own).
    """
    db = orm.new_session_factory(db_url)()
    try:
        if UserInfo.find(db, username):
            return False
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt())
        db.add(UserInfo(username=username, password=hashed, is_authorized=authorized))
        db.commit()
        return True
    finally:
        db.close()
        db.get_bind().dispose()


def main() -> int:
    data = Path(os.environ.get("BAI_DATA_DIR", "var")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    db_url = os.environ.get("BAI_HUB_DB_URL", f"sqlite:///{data / 'jupyterhub.sqlite'}")
    admin = os.environ.get("BAI_ADMIN_USER", "admin")
    pw_file = data / "admin-password"
    password = secrets.token_urlsafe(12)
    if ensure_account(db_url, admin, password):
        pw_file.write_text(password + "\n")
        pw_file.chmod(0o600)
        print(f"[bai-hub] First admin '{admin}' created. Password: {password}  (also in {pw_file})")
    elif pw_file.exists():
        print(f"[bai-hub] Admin '{admin}' exists; its first password is in {pw_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
